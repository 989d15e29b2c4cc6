#!/usr/bin/env python
"""`make reproduce`: the Kimi K2 report's claims, re-measured at small scale, in one report.

    python reproduce/run.py [--preset cpu|gpu] [--quick] [--only 1,3] [--root DIR] [--report-dir DIR]

This file only orchestrates: it runs each experiment and writes REPORT.md. The pieces:

  common.py          PRESETS (how big each experiment is: quick = micro model, minutes; cpu = tiny model,
                     target 90 minutes on 2 idle cores; gpu = the small model on one GPU), the `k2` runner
                     (every step is `k2 --root ROOT --reuse <stage> --recipe recipes/<base>/<stage>.toml --set ...`,
                     logged and copied into the report; `--reuse` makes a step whose latest artifact has the same
                     recipe and inputs a no-op, so running this script again continues where it stopped), the
                     steps experiments share, and the artifact readers
  stats.py           the arithmetic and the verdict rules (data: the first rule that holds names the verdict)
  experiments/*.py   one module per experiment:  1 optimizers (MuonClip vs Muon vs AdamW)  2 rephrasing vs epochs
                     3 sparsity  4 context extension  5 rl. Each has commands(ctx) -> runs, measure(ctx, runs) ->
                     a dataclass of numbers read back from the artifacts, plots, section (its report text),
                     summary (rows: claim, paper, measured, verdict) and its rule lists
  report.py          REPORT.md: the summary table, one section per experiment with plots, seeds, the exact
                     commands and wall times

Artifacts go to reproduce/artifacts/<preset>/ (gitignored); the report and its PNGs to reproduce/
(--quick: to the artifacts root, so a smoke run never overwrites the real report).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import `reproduce` from the repository root, and not this
    # folder's modules as top-level names (python puts the script's folder first on the path)
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]

from reproduce.common import HERE, K2, PRESETS, Context, Section, Skipped, StepFailed, k2_executable  # noqa: E402
from reproduce.experiments import context, optimizers, rephrasing, rl, sparsity  # noqa: E402
from reproduce.report import render, summary_table  # noqa: E402

EXPERIMENTS = [("1", optimizers), ("2", rephrasing), ("3", sparsity), ("4", context), ("5", rl)]


def run_experiment(exp, ctx: Context, sec: Section) -> None:
    """Commands, then numbers read back from the artifacts, then plots and text: the same shape for every experiment."""
    try:
        runs = exp.commands(ctx)
    except Skipped as s:
        sec.status = "skipped"
        sec.body.append(s.reason)
        sec.summary.append(s.summary)
        return
    m = exp.measure(ctx, runs)
    sec.plots = exp.plots(ctx, m)
    sec.body = exp.section(ctx, m, sec.plots)
    sec.summary = exp.summary(ctx, m)


def main(argv=None, runner=K2) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="experiment sizes (default: cpu)")
    ap.add_argument("--quick", action="store_true", help="micro scale, a few minutes: a smoke test of the whole driver")
    ap.add_argument("--only", default="", help="comma-separated experiment numbers or names (default: all)")
    ap.add_argument("--root", default=None, help="artifacts root (default: reproduce/artifacts/<preset>)")
    ap.add_argument("--render-only", action="store_true", help="run nothing; re-render the report from existing artifacts")
    ap.add_argument("--report-dir", default=None, help="where REPORT.md and the PNGs go (default: reproduce/; --quick: the root)")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    P = PRESETS[preset]
    root = Path(args.root).resolve() if args.root else HERE / "artifacts" / preset
    report_dir = Path(args.report_dir).resolve() if args.report_dir else (root / "report" if args.quick else HERE)
    report_dir.mkdir(parents=True, exist_ok=True)
    k2 = runner(root=root, exe=k2_executable(), render_only=args.render_only)
    ctx = Context(preset, P, root, report_dir, k2)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    t_start = time.time()
    sections, failed = [], 0
    for num, exp in EXPERIMENTS:
        sec = Section(exp.KEY, exp.TITLE)
        sections.append(sec)
        if only and num not in only and exp.KEY not in only:
            sec.status = "skipped"
            sec.body.append("not run in this invocation (`--only`).")
            continue
        k2.exp = exp.KEY
        print(f"== experiment {num}: {exp.TITLE}", flush=True)
        t0 = time.time()
        try:
            run_experiment(exp, ctx, sec)
        except Exception as e:  # one experiment failing leaves the others and the report intact
            failed += 1
            sec.status = "failed"
            msg = str(e) if isinstance(e, StepFailed) else traceback.format_exc()
            sec.body += ["```", msg.strip()[-3000:], "```"]
            sec.summary.append([exp.TITLE, "-", "-", "failed (see section)"])
            print(f"!! experiment {num} failed: {msg.strip().splitlines()[0]}", flush=True)
        sec.wall_s = time.time() - t0
        print(f"== experiment {num}: {sec.status} in {sec.wall_s / 60:.1f} min", flush=True)
    render(preset, P, sections, k2, time.time() - t_start, report_dir)
    print(f"\nwrote {report_dir / 'REPORT.md'} in {(time.time() - t_start) / 60:.1f} min\n")
    print(summary_table(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
