"""REPORT.md: a summary table (paper vs measured vs verdict), wall times, then one section per experiment with
its plots and the exact commands (from the runner's ledger: what ran, what was up to date, how long it took)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from reproduce.common import REPO, K2, Section


def machine_line() -> str:
    """Where the numbers were measured: CPU model and cores, and the commit of the code that ran."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return f"Machine: {cpu}, {os.cpu_count()} cores" + (f"; code at commit `{commit}`" if commit else "") + "."


def summary_rows(sections: list[Section]) -> list[str]:
    """One table row per summary row, numbered by experiment; '|' inside a cell would break the table."""
    return [f"| {n} | " + " | ".join(c.replace("|", "/") for c in r) + " |"
            for n, s in zip("12345", sections) for r in s.summary]


def shown_root(k2: K2) -> Path:
    return k2.root.relative_to(REPO) if k2.root.is_relative_to(REPO) else k2.root


def commands_block(s: Section, k2: K2) -> list[str]:
    """The experiment's commands, each with its ledger status and wall time, folded."""
    cmds = list(dict.fromkeys(k2.commands.get(s.key, [])))  # in order, each once
    if not cmds:
        return []
    total = sum(k2.ledger.get(c, {}).get("wall_s", 0) for c in cmds if k2.ledger.get(c, {}).get("exp") == s.key)
    out = [f"<details><summary>commands ({len(cmds)}; {total / 60:.1f} min of compute made here, "
           "the rest shared with earlier experiments)</summary>", "",
           "```bash", f"ROOT={shown_root(k2)}"]
    for c in cmds:
        led = k2.ledger.get(c, {})
        note = f", made by experiment {led['exp']}" if led.get("exp") not in (None, s.key) else ""
        out.append(f"{c}    # {led.get('status', '?')}, {led.get('wall_s', 0):.0f} s{note}")
    return out + ["```", "", "</details>", ""]


def render(preset: str, P: dict, sections: list[Section], k2: K2, wall_s: float, report_dir: Path) -> str:
    made = lambda exp=None: sum(v["wall_s"] for v in k2.ledger.values()  # noqa: E731
                                if v["status"] == "ran" and (exp is None or v.get("exp") == exp))
    out = [
        "# K2's claims, re-measured at small scale",
        "",
        f"`make reproduce` (preset **{preset}**: recipes `recipes/{P['base']}/*.toml` plus `--set` overrides) ran every "
        "experiment below through the ordinary `k2` command line; every number is read back from the artifacts those "
        "commands wrote. Seeds are stated per experiment; most results are one run, so read small differences with the "
        "noise estimates given.",
        "",
        f"This invocation: {wall_s / 60:.1f} min wall time"
        + f"; compute that made the artifacts: {made() / 60:.1f} min "
          "(steps that were up to date cost nothing). " + machine_line(),
        "",
        "## Summary",
        "",
        "| # | claim | paper | measured here | verdict |",
        "|---|---|---|---|---|",
    ]
    out += summary_rows(sections) or ["| | (no experiment ran) | | | |"]
    out += ["", "Wall time per experiment:", "", "| experiment | status | this invocation | compute that made its artifacts |",
            "|---|---|---:|---:|"]
    for n, s in zip("12345", sections):
        out.append(f"| {n}. {s.title} | {s.status} | {s.wall_s / 60:.1f} min | {made(s.key) / 60:.1f} min |")
    out += ["", "Verdicts: *reproduced* (the direction and, where a noise estimate exists, beyond twice it), *within noise* "
            "(the difference is below twice its noise estimate, which the verdict names), *partly*, *not reproduced* "
            "(measured numbers given), *probe failed* (the measuring instrument failed its own gate, so the claim was not "
            "tested), *not tested at this scale* (the design cannot resolve the claim here; the numbers say why), *not run*. "
            "Each verdict is the first rule of its experiment's rule list (reproduce/experiments/*.py) that the "
            "measurement satisfies.", ""]
    for n, s in zip("12345", sections):
        out += [f"## {n}. {s.title}", ""]
        if s.status == "failed":
            out.append("**failed** — see the error below; the rest of the report is unaffected.")
            out.append("")
        out += s.body + [""] + commands_block(s, k2)
    out += ["## Notes", "",
            "- Scale: these are models of about 10^6 parameters trained on about 10^6 tokens; the paper's claims are about "
            "10^12-parameter models on 10^13 tokens. A claim that does not reproduce here is reported as such, with the numbers.",
            "- Re-running `make reproduce` reuses every artifact whose recipe and inputs are unchanged (`k2 --reuse`) and "
            "resumes an interrupted training run from its last checkpoint.",
            f"- Artifacts: `{shown_root(k2)}` "
            "(`k2 --root DIR artifacts list` shows them; `k2 artifacts show REF` walks the lineage).", ""]
    text = "\n".join(out)
    (report_dir / "REPORT.md").write_text(text)
    return text


def summary_table(sections: list[Section]) -> str:
    """The summary for the terminal, after a run."""
    return "\n".join(["| # | claim | paper | measured | verdict |", "|---|---|---|---|---|"] + summary_rows(sections))
