"""PNG plots of an RL run: rewards (train and held-out, per environment), critic accuracy, rollout statistics."""

from __future__ import annotations

from pathlib import Path

from k2cli.train.plots import _plt, _series


def plot_rewards(history: list[dict], start: dict, path: Path, envs: list[str]) -> Path | None:
    """Left: train reward per environment per step. Right: held-out reward per environment and critic
    accuracy at each evaluation, the starting model's value at step 0."""
    if not history:
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for i, env in enumerate(envs):
        for key in (f"reward_{env}", f"rubric_reward_{env}"):
            x, y = _series(history, key)
            if x:
                ax.plot(x, y, lw=1, color=f"C{i}", label=env if key.startswith("reward") else f"{env} (rubric)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the rollouts")
    ax.set_title("train rewards (before penalties)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    keys = [f"heldout_{e}" for e in envs] + [f"heldout_{e}_facts" for e in envs] + ["critic_accuracy"]
    for i, key in enumerate(keys):
        x, y = _series(history, key)
        if key in start:
            x, y = [0] + x, [start[key]] + y
        if x:
            style = "k--" if key == "critic_accuracy" else "o-"
            ax2.plot(x, y, style, ms=3, lw=1, label=key.replace("heldout_", ""))
    ax2.axhline(0.5, color="gray", lw=0.6, ls=":")
    ax2.set_xlabel("step (0 = the starting model)")
    ax2.set_title("held-out reward per environment; critic pairwise accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.9, wspace=0.2)  # fixed: tight_layout costs seconds
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_rollout_stats(history: list[dict], path: Path) -> Path | None:
    panels = [("response_tokens", "response tokens"), ("truncated_rate", "truncated fraction"), ("temperature", "temperature"),
              ("log_ratio_abs_max", "max |log pi/pi_old|"), ("ptx_loss", "PTX loss (nats/token)"), ("critic_loss", "critic loss")]
    panels = [(k, t) for k, t in panels if _series(history, k)[0]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 2.8), dpi=110, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        # the first update on a batch of rollouts (the step that made them) is at pi_old: log ratio ~0, skipped
        rows = [r for r in history if "rollout_s" not in r] if key.startswith("log_ratio") else history
        x, y = _series(rows, key)
        ax.plot(x, y, lw=1, marker="." if len(x) < 40 else None)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.16, top=0.88, wspace=0.35)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
