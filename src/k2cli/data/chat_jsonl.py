"""Chat data in the OpenAI / TRL format: JSONL files of {"messages": [...], "tools": [...]} rows.

    {"messages": [{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                  {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
                      "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\": 4}"},
                  {"role": "assistant", "content": "4 °C."}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {...}}}]}

Every row is normalised (`chat.from_openai`: developer -> system, text parts joined, call ids renamed to
the template's `functions.NAME:IDX`), rendered with the model's tokenizer (its own chat template) and kept as
ids + assistant mask, the examples `sft_data.build_sft_data` packs. A row that cannot be used is skipped and
reported with its file and line; the whole read fails only when more than `max_bad_fraction` of the rows are
bad (or none is good), with one error naming the first bad rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from k2cli.data.chat import from_openai, render
from k2cli.errors import K2Error


@dataclass
class ChatReport:
    files: list[str]
    rows: int = 0
    kept: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    fingerprint: str = ""  # sha256 of the files' bytes: a run (and its resume) is tied to their content

    def summary(self, show: int = 5) -> str:
        """One line: counts, and the first skipped rows with their reasons."""
        line = f"{self.kept} of {self.rows} chat rows used"
        if self.skipped:
            first = "; ".join(f"{Path(f).name}:{n} {why}" for f, n, why in self.skipped[:show])
            line += f", {len(self.skipped)} skipped ({first}{'; ...' if len(self.skipped) > show else ''})"
        return line


def chat_files(paths) -> list[Path]:
    """One or more .jsonl files or directories (every *.jsonl below them, sorted)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise K2Error(f"chat data directory {p} has no .jsonl files", "put the chat rows in *.jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise K2Error(f"chat data {p} does not exist", "pass JSONL files or a directory of them")
    if not files:
        raise K2Error("no chat data given", "pass one or more JSONL files or a directory")
    return files


def parse_row(line: str, where: str) -> dict:
    """One JSONL line -> {"messages", "tools", "call_ids"}; raises K2Error with the reason."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise K2Error(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "each line must be one JSON object")
    if not isinstance(row, dict) or "messages" not in row:
        raise K2Error(f"{where}: no 'messages' field", 'each row is {"messages": [...], "tools": [...]}')
    messages, tools = row["messages"], row.get("tools")
    if isinstance(messages, str):  # some exports store the list as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise K2Error(f"{where}: 'messages' is a string that is not JSON ({e.msg})", "give messages as a list")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise K2Error(f"{where}: 'tools' is a string that is not JSON ({e.msg})", "give tools as a list")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise K2Error(f"{where}: 'tools' must be a list of function schemas", '[{"type": "function", "function": {...}}]')
    messages, back = from_openai(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise K2Error(f"{where}: no assistant message", "a training row needs at least one assistant message")
    return {"messages": messages, "tools": tools or None, "call_ids": back}


def read_chat_jsonl(paths, tokenizer, max_bad_fraction: float = 0.05) -> tuple[list[dict], ChatReport]:
    """Conversations of the files, rendered: [{"messages", "tools", "source": "file:line", "ids", "mask"}].

    Rows that cannot be used (malformed JSON, unknown role, arguments that are not JSON, a tool message
    without a matching call, a conversation the template refuses) are skipped and listed in the report.
    Raises K2Error when the tokenizer has no chat template, when no row is usable, or when the bad rows are
    more than `max_bad_fraction` of all."""
    if not tokenizer.chat_template:
        raise K2Error(f"the model's tokenizer{tokenizer.where} has no chat template, so chat data cannot be rendered",
                      "add a chat_template to its tokenizer_config.json (or a chat_template.jinja file)")
    files = chat_files(paths)
    report = ChatReport([str(f) for f in files])
    convs, digest = [], hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                report.rows += 1
                where = f"{f.name} line {n}"
                try:
                    conv = parse_row(line, where)
                    r = render(tokenizer, conv["messages"], conv["tools"])
                except K2Error as e:
                    report.skipped.append((str(f), n, e.message.removeprefix(where + ": ").removeprefix(where + ", ")))
                    continue
                if not any(r.mask):
                    report.skipped.append((str(f), n, "no assistant token to train on"))
                    continue
                convs.append({**conv, "source": f"{f}:{n}", "ids": r.ids, "mask": r.mask})
                report.kept += 1
    report.fingerprint = digest.hexdigest()[:16]
    bad = len(report.skipped)
    if report.rows == 0:
        raise K2Error(f"the chat data ({', '.join(f.name for f in files)}) has no rows", "one JSON object per line")
    if not convs or bad > max_bad_fraction * report.rows:
        first = "; ".join(f"{Path(f).name} line {n}: {why}" for f, n, why in report.skipped[:3])
        raise K2Error(f"{bad} of {report.rows} chat rows cannot be used (more than data.max_bad_fraction={max_bad_fraction:g}); "
                      f"first: {first}", "fix those rows, or raise data.max_bad_fraction to skip them")
    return convs, report
