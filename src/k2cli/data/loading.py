"""Read a text corpus from a dataset artifact or local files into an HF `datasets.Dataset`.

Accepted inputs:
  * a k2 dataset artifact (ref or path): its `corpus/` subset;
  * a directory written by `datasets.Dataset.save_to_disk`, or by `DatasetDict.save_to_disk`
    (`DIR@SPLIT` picks the split; the default is `train`, or the only split there is);
  * files: `.txt` (one document per file), `.jsonl` / `.json` (one record per line with a text
    field), `.parquet`; a directory of such files;
  * a Hugging Face Hub dataset, `hf:NAME[:CONFIG][@SPLIT]` (split slicing works: `@train[:1%]`):
    downloaded once into the Hugging Face cache (Arrow files, memory-mapped, so a large dataset
    never sits in RAM), then tokenised into k2's token cache like any corpus. Offline, a Hub name is
    one clear error.

Paths are recorded absolute (`absolute_corpus_ref`), so a later stage run from another directory
finds the same corpus.

The result always has a `text` column (and `doc_id`). Every failure is a K2Error that names
the file and, for JSON lines, the line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from k2cli.errors import K2Error

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


HUB_PREFIX = "hf:"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _is_saved_dataset_dict(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def parse_hub_ref(ref: str) -> tuple[str, str | None, str] | None:
    """"hf:NAME[:CONFIG][@SPLIT]" -> (name, config or None, split, default "train"); None otherwise."""
    if not str(ref).startswith(HUB_PREFIX):
        return None
    body, _, split = str(ref)[len(HUB_PREFIX) :].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise K2Error(f"no dataset name in {ref!r}", "write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG@SPLIT")
    return name, config or None, split or "train"


def _split_suffix(ref: str) -> tuple[str, str | None]:
    """"DIR@SPLIT" -> (DIR, SPLIT) when DIR exists and "DIR@SPLIT" does not; else (ref, None)."""
    head, at, split = str(ref).rpartition("@")
    if at and not Path(str(ref)).exists() and Path(head).exists():
        return head, split
    return str(ref), None


def is_plain_corpus(ref: str) -> bool:
    """Whether `ref` names a corpus that is not a k2 artifact: files, a folder, a saved dataset, hf:NAME."""
    if parse_hub_ref(ref):
        return True
    path = Path(_split_suffix(ref)[0])
    return path.exists() and not (path / "manifest.json").is_file()


def absolute_corpus_ref(ref: str) -> str:
    """The reference to record in a manifest: local paths made absolute (never relative to the working
    directory); artifact refs (stage:vN) and Hub names as they are."""
    path, split = _split_suffix(ref)
    if parse_hub_ref(ref) or not Path(path).exists():
        return str(ref)
    return str(Path(path).resolve()) + (f"@{split}" if split else "")


def corpus_source(ref: str) -> tuple[object, list[Path]]:
    """(artifact or None, files/dirs that hold the text) for a local input reference."""
    from k2cli.artifacts import MANIFEST, open_artifact, resolve

    ref, _ = _split_suffix(ref)
    path = resolve(ref) if ":" in str(ref) and not Path(str(ref)).exists() else Path(ref)
    if path.is_dir() and (path / MANIFEST).is_file():
        art = open_artifact(path, kind="dataset")
        corpus = art.path / "corpus"
        if not corpus.is_dir():
            raise K2Error(f"dataset artifact {art.id} has no corpus/", "pass a dataset made by 'k2 data synth' or 'k2 rephrase'")
        art.check("corpus")  # the Arrow files about to be read match the manifest (cached hashes: cheap)
        return art, [corpus]
    if not path.exists():
        raise K2Error(f"corpus not found: {ref}", "pass a dataset artifact, a save_to_disk directory, or .txt/.jsonl/.parquet files")
    if _is_saved_dataset(path) or _is_saved_dataset_dict(path):
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
    art, paths = (None, []) if parse_hub_ref(ref) else corpus_source(ref)
    if parse_hub_ref(ref):
        ds = _load_hub(ref)
    elif len(paths) == 1 and paths[0].is_dir():
        ds = _load_saved(paths[0], _split_suffix(ref)[1], ref)
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
        ds = ds.rename_column(text_field, "text") if "text" not in ds.column_names else ds.map(lambda r: {"text": r[text_field]}, keep_in_memory=True)
    # in memory: an indices mapping, never a cache-*.arrow written into the (verified, immutable) artifact
    ds = ds.filter(lambda r: isinstance(r["text"], str) and r["text"].strip() != "", keep_in_memory=True)
    if len(ds) == 0:
        raise K2Error(f"corpus {ref} is empty (no non-blank text)", "pass a corpus with text in it")
    if "doc_id" not in ds.column_names:
        ds = ds.add_column("doc_id", [f"doc-{i}" for i in range(len(ds))])
    return ds, art


def load_part(art, name: str):
    """A part of a dataset artifact (`qa_test`, `math`, `chat`, ...: a save_to_disk directory), verified against
    the manifest before it is read; None when the artifact has no such part."""
    import datasets

    path = Path(art.path) / name
    if not path.is_dir():
        return None
    art.check(name)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged directory: datasets raises many types
        raise K2Error(f"cannot read {name}/ of {art.id}: {str(e).splitlines()[0][:200]}",
                      "the artifact is damaged; re-run the stage that made it") from None


def _load_saved(path: Path, split: str | None, ref: str):
    """A `save_to_disk` directory: a Dataset, or one split of a DatasetDict."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except OSError as e:  # unreadable (permissions, I/O)
        raise K2Error(f"cannot read the saved dataset {path}: {e.strerror or e}", "check its permissions") from None
    except Exception as e:  # a damaged directory: datasets raises many types
        raise K2Error(f"cannot read the saved dataset {path}: {str(e).splitlines()[0][:200]}", "save it again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        pick = split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
        if pick not in ds:
            raise K2Error(f"{ref} is a DatasetDict with splits {splits}" + (f", not '{split}'" if split else ""),
                          f"name the split: {path}@{splits[0]}")
        return ds[pick]
    if split:
        raise K2Error(f"{path} is a single Dataset, it has no split '{split}'", f"drop '@{split}'")
    return ds


def _load_hub(ref: str):
    """A Hub dataset (downloaded once into the HF cache, Arrow-backed): one line when it cannot be had."""
    import datasets

    name, config, split = parse_hub_ref(ref)
    datasets.logging.set_verbosity_error()  # retries are logged as warnings: the error below says it once
    try:
        import huggingface_hub

        huggingface_hub.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad config/split: datasets raises many types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise K2Error(f"cannot load Hub dataset {name}" + (f" ({config})" if config else "") + f" split {split}: {reason}",
                      "check the name and your network (HF_HUB_OFFLINE=1 uses only the local cache), or pass a local "
                      "copy: files, or a directory written by save_to_disk") from None


def corpus_fingerprint(ref: str) -> str:
    """A content hash of the input, for cache keys (manifest hash for artifacts, bytes for files)."""
    from k2cli.artifacts import sha256_file

    h = hashlib.sha256()
    if parse_hub_ref(ref):  # the cache files datasets loaded: its own content fingerprint
        h.update(str(ref).encode())
        h.update(_load_hub(ref)._fingerprint.encode())
        return h.hexdigest()[:16]
    art, paths = corpus_source(ref)
    h.update((_split_suffix(ref)[1] or "").encode())
    if art is not None:
        h.update(sha256_file(art.path / "manifest.json").encode())
        return h.hexdigest()[:16]
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]
