"""Read a text corpus from a dataset artifact or local files into an HF `datasets.Dataset`.

Accepted inputs:
  * a k2 dataset artifact (ref or path): its `corpus/` subset;
  * a directory written by `datasets.Dataset.save_to_disk`;
  * files: `.txt` (one document per file), `.jsonl` / `.json` (one record per line with a text
    field), `.parquet`; a directory of such files.

The result always has a `text` column (and `doc_id`). Every failure is a K2Error that names
the file and, for JSON lines, the line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from k2cli.errors import K2Error

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def corpus_source(ref: str) -> tuple[object, list[Path]]:
    """(artifact or None, files/dirs that hold the text) for an input reference."""
    from k2cli.artifacts import MANIFEST, open_artifact, resolve

    path = resolve(ref) if ":" in str(ref) and not Path(str(ref)).exists() else Path(ref)
    if path.is_dir() and (path / MANIFEST).is_file():
        art = open_artifact(path, kind="dataset")
        corpus = art.path / "corpus"
        if not corpus.is_dir():
            raise K2Error(f"dataset artifact {art.id} has no corpus/", "pass a dataset made by 'k2 data synth' or 'k2 rephrase'")
        return art, [corpus]
    if not path.exists():
        raise K2Error(f"corpus not found: {ref}", "pass a dataset artifact, a save_to_disk directory, or .txt/.jsonl/.parquet files")
    if _is_saved_dataset(path):
        return None, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise K2Error(f"no .txt/.jsonl/.json/.parquet files under {path}", "point to a corpus directory or file")
        return None, files
    if path.suffix not in SUFFIXES:
        raise K2Error(f"unsupported corpus file {path.name}", "use .txt, .jsonl, .json or .parquet")
    return None, [path]


def _check_jsonl(path: Path, text_field: str) -> None:
    """Validate JSON lines up front, so errors name the line (datasets' own errors do not)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise K2Error(f"{path} line {n} is not UTF-8 text", "re-encode the file as UTF-8")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise K2Error(f"{path} line {n} is not valid JSON ({e.msg})", "fix or remove that line")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise K2Error(f"{path} line {n} has no string '{text_field}' field", f"add it, or choose the field with data.text_field")


def _check_utf8(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise K2Error(f"{path} is not UTF-8 text (byte {e.start})", "re-encode the file as UTF-8")


def load_corpus(ref: str, text_field: str = "text"):
    """Load the corpus as a Dataset with columns `text` and `doc_id`; never empty."""
    import datasets

    datasets.disable_progress_bars()
    art, paths = corpus_source(ref)
    if len(paths) == 1 and paths[0].is_dir():
        ds = datasets.load_from_disk(str(paths[0]))
    else:
        kinds = {SUFFIXES[p.suffix] for p in paths}
        if len(kinds) > 1:
            raise K2Error(f"mixed corpus file types under {ref}: {sorted(kinds)}", "use one kind of file per corpus")
        kind = kinds.pop()
        for p in paths:
            if kind == "json" and p.suffix == ".jsonl":
                _check_jsonl(p, text_field)
            elif kind == "text":
                _check_utf8(p)
        files = [str(p) for p in paths]
        try:
            if kind == "text":
                ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
            else:
                ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:  # datasets wraps parse errors in many types
            raise K2Error(f"cannot read corpus {ref}: {str(e).splitlines()[0][:200]}", "check the file format")
    if text_field not in ds.column_names:
        raise K2Error(f"corpus {ref} has no '{text_field}' column (columns: {ds.column_names})", "choose the field with data.text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text") if "text" not in ds.column_names else ds.map(lambda r: {"text": r[text_field]})
    ds = ds.filter(lambda r: isinstance(r["text"], str) and r["text"].strip() != "")
    if len(ds) == 0:
        raise K2Error(f"corpus {ref} is empty (no non-blank text)", "pass a corpus with text in it")
    if "doc_id" not in ds.column_names:
        ds = ds.add_column("doc_id", [f"doc-{i}" for i in range(len(ds))])
    return ds, art


def corpus_fingerprint(ref: str) -> str:
    """A content hash of the input, for cache keys (manifest hash for artifacts, bytes for files)."""
    from k2cli.artifacts import sha256_file

    art, paths = corpus_source(ref)
    h = hashlib.sha256()
    if art is not None:
        h.update(sha256_file(art.path / "manifest.json").encode())
        return h.hexdigest()[:16]
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]
