"""What the `make reproduce` tests share (tests/test_reproduce*.py): two runners and fabricated artifacts.

  InProcessK2   the driver's runner invoking the `k2` click group in this process (no process start-up per step)
  Recorder      a runner with no `k2` behind it: every step answers "up to date"; the test writes the
                artifacts the experiment reads back (`fake`), with numbers chosen so each verdict is known
  quick_context, run_section, verdicts   one experiment run whole (commands, measure, plots, section, summary)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `reproduce` package sits at the top of the repository

from reproduce import common, run  # noqa: E402


class InProcessK2(run.K2):
    """The driver's runner, invoking the `k2` click group in this process instead of a subprocess."""

    def execute(self, argv, log, env):
        from k2cli.cli import cli

        result = CliRunner().invoke(cli, argv, catch_exceptions=False)  # --root and --reuse are arguments: no environment to restore
        log.write(result.output)
        return result.exit_code


class Recorder(run.K2):
    """The driver's runner with no `k2` behind it: every step is up to date (k2 rl exists unless `no_rl`)."""

    no_rl = False

    def execute(self, argv, log, env):
        if self.no_rl and argv[:1] == ["rl"]:
            return 2
        log.write(f"up to date: {argv[-1]}\n")
        return 0


def fake(root: Path, name: str, metrics: dict | None = None, *, kind="model", recipe=None, history=(), files=None):
    """A version-1 artifact ROOT/name/v1 with ROOT/name/latest -> v1, as `k2` writes one."""
    d = root / name / "v1"
    d.mkdir(parents=True)
    manifest = {"schema_version": 1, "kind": kind, "stage": name, "id": f"{name}/v1", "files": {},
                "metrics": metrics or {}, "recipe": recipe or {}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    if history:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    for fname, content in (files or {}).items():
        (d / fname).write_bytes(content) if isinstance(content, bytes) else (d / fname).write_text(content)
    (root / name / "latest").symlink_to("v1")


def quick_context(tmp_path, runner=Recorder) -> common.Context:
    root, report = tmp_path / "root", tmp_path / "report"
    report.mkdir(parents=True)
    return common.Context("quick", common.PRESETS["quick"], root, report, runner(root=root, exe="k2"))


def run_section(exp, ctx) -> common.Section:
    sec = common.Section(exp.KEY, exp.TITLE)
    ctx.k2.exp = exp.KEY
    run.run_experiment(exp, ctx, sec)
    for png in sec.plots:
        assert (ctx.report_dir / png).stat().st_size > 1000, png
        assert f"]({png})" in "\n".join(sec.body)
    return sec


def verdicts(sec) -> list[str]:
    return [row[3] for row in sec.summary]
