"""PNG plots of a run's metrics.jsonl: loss, max attention logit, router balance."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> None:
    """Write the figure; a full disk or a forbidden path is one K2Error naming the plot, not a traceback."""
    from k2cli.errors import K2Error

    try:
        fig.tight_layout()
        fig.savefig(path)
    except OSError as e:
        raise K2Error(f"cannot write the plot {path}: {e.strerror}",
                      "free disk space, or choose another artifacts root (k2 --root DIR)") from None
    finally:
        plt.close(fig)


def _series(history, key):
    pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(history: list[dict], path: Path, title: str = "loss", reference: dict | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    x, y = _series(history, "loss")
    ax.plot(x, y, lw=1, label="train loss")
    x, y = _series(history, "val_loss")
    if x:
        ax.plot(x, y, "o-", ms=3, label="validation loss")
    for name, value in (reference or {}).items():
        ax.axhline(value, ls="--", lw=0.8, color="gray")
        ax.text(ax.get_xlim()[0], value, f" {name}", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return Path(path)


def plot_max_logits(history: list[dict], path: Path, tau: float | None = None, title: str = "max attention logit") -> Path | None:
    rows = [r for r in history if "max_logit_per_layer" in r]
    if not rows:
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6, 4.8), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in rows]
    for layer in range(len(rows[0]["max_logit_per_layer"])):
        ax.plot(steps, [r["max_logit_per_layer"][layer] for r in rows], lw=1, label=f"layer {layer}")
    top = max(max(r["max_logit_per_layer"]) for r in rows)
    if tau and top >= tau / 3:
        ax.axhline(tau, ls="--", color="red", lw=1, label=f"tau = {tau:g}")
    elif tau:  # far below the threshold: say so rather than squash the curves
        ax.text(0.99, 0.97, f"QK-Clip tau = {tau:g} (above this range)", transform=ax.transAxes, ha="right", va="top",
                fontsize=7, color="red")
    ax.set_ylabel("max logit (per layer)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    x, y = _series(rows, "heads_clipped_total")
    if x:
        ax2.bar(x, y, width=1.0, color="tab:red")
    ax2.set_ylabel("heads clipped")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    _save(plt, fig, path)
    return Path(path)


def plot_expert_load(history: list[dict], path: Path) -> Path | None:
    rows = [r for r in history if "expert_load" in r]
    if not rows:
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    x, y = _series(rows, "expert_imbalance")
    ax.plot(x, y, lw=1)
    ax.axhline(1.0, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("router imbalance (1 = balanced)")
    ax.grid(alpha=0.3)
    final = rows[-1]["expert_load"]  # [layers, experts], fractions
    im = ax2.imshow(final, aspect="auto", cmap="viridis")
    ax2.set_xlabel("expert")
    ax2.set_ylabel("MoE layer")
    ax2.set_yticks(range(len(final)))
    ax2.set_title(f"expert load at step {rows[-1]['step']}")
    fig.colorbar(im, ax=ax2, fraction=0.046)
    _save(plt, fig, path)
    return Path(path)
