"""Versioned artifact directories: the only way stages hand work to each other.

An artifact is a directory with a `manifest.json` that says what it is (kind, stage,
version), how it was made (the fully resolved recipe, the k2cli version and git commit),
what it was made from (its inputs' ids and manifest hashes, so lineage can be walked
back to the raw inputs), and what it holds (every file with its sha256).

Layout under the artifacts root (`k2 --root DIR`, which a stage receives as an argument and
holds for its duration with `using_root`; else `$K2_ARTIFACTS`; else `./artifacts`):

    <root>/<stage>/v1/manifest.json ...
    <root>/<stage>/v2/...
    <root>/<stage>/latest -> v2          (a symlink, replaced atomically)
    <root>/<stage>/runs/<name>/          (run directories: checkpoints of unfinished runs)

A reference is a path (`./artifacts/pretrain/v3`, `/tmp/m`), `stage:vN`, or `stage:latest`.

Writing always happens in a hidden temporary directory next to the destination, which is
renamed into place only when complete, so an interrupted stage never leaves a half
artifact and never touches the previous versions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from k2cli.errors import K2Error

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("dataset", "tokenizer", "model", "eval", "report")


# ----------------------------------------------------------------------------- locations


_root: Path | None = None  # set by `using_root` (k2 --root, a stage's RunOptions.root) for its duration


def artifacts_root() -> Path:
    """The root a running command or stage was given (`using_root`), else $K2_ARTIFACTS, else ./artifacts."""
    return _root or Path(os.environ.get("K2_ARTIFACTS", "artifacts"))


@contextmanager
def using_root(root: str | os.PathLike | None):
    """Resolve references and write artifacts under `root` for the duration (None: unchanged).
    A plain module value, not a context variable: threads a command starts (a server's) see it too."""
    global _root
    if root is None:
        yield
        return
    saved, _root = _root, Path(root)
    try:
        yield
    finally:
        _root = saved


def stage_dir(stage: str) -> Path:
    return artifacts_root() / stage


def resolve(ref: str | os.PathLike) -> Path:
    """Turn a reference into a directory path (which may not exist yet)."""
    ref = str(ref)
    if ":" in ref and not os.path.exists(ref) and "/" not in ref.split(":", 1)[0]:
        stage, version = ref.split(":", 1)
        if version == "latest":
            link = stage_dir(stage) / "latest"
            if not link.exists():
                raise K2Error(
                    f"no artifact '{ref}': {stage_dir(stage)} has no versions yet",
                    f"run the '{stage}' stage first, or pass a path",
                )
            return stage_dir(stage) / os.readlink(link) if link.is_symlink() else link
        if not (version.startswith("v") and version[1:].isdigit()):
            raise K2Error(f"bad artifact reference '{ref}'", "use a path, 'stage:vN' or 'stage:latest'")
        return stage_dir(stage) / version
    return Path(ref)


# ----------------------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def recipe(self) -> dict:
        return self.manifest.get("recipe", {})

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def ref(self) -> dict:
        """How another artifact records this one as an input."""
        return {
            "id": self.id,
            "kind": self.kind,
            "path": str(self.path.resolve()),
            "manifest_sha256": sha256_file(self.path / MANIFEST),
        }

    def verify(self) -> list[str]:
        """Re-hash every file; return one line per problem (empty when intact)."""
        problems = []
        for name, info in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.exists():
                problems.append(f"{name}: missing")
            elif sha256_file(p) != info["sha256"]:
                problems.append(f"{name}: sha256 mismatch (file was changed after the artifact was written)")
        return problems


def open_artifact(ref: str | os.PathLike, kind: str | tuple[str, ...] | None = None, verify: bool = False) -> Artifact:
    """Open an artifact and check it is what the caller expects."""
    path = resolve(ref)
    if not path.exists():
        raise K2Error(f"artifact not found: {ref}", "check the path, or list what exists with 'k2 artifacts list'")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise K2Error(f"{path} is not a k2 artifact (no {MANIFEST})", "pass an artifact directory written by k2")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"corrupt manifest {mpath}: {e}", "the artifact is damaged; re-run the stage that made it")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise K2Error(
            f"{path}: unknown artifact schema version {version!r} (this k2 reads version {SCHEMA_VERSION})",
            "re-create the artifact with this k2 version",
        )
    for key in ("kind", "stage", "id", "files"):
        if key not in manifest:
            raise K2Error(f"corrupt manifest {mpath}: no '{key}'", "re-run the stage that made it")
    art = Artifact(path, manifest)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else kind
        if art.kind not in kinds:
            raise K2Error(
                f"{ref} is a {art.kind} artifact, expected {' or '.join(kinds)}",
                f"pass a {kinds[0]} artifact",
            )
    if verify:
        problems = art.verify()
        if problems:
            raise K2Error(f"{ref} failed verification: {problems[0]}", "re-run the stage that made it")
    return art


def list_artifacts() -> list[Artifact]:
    root = artifacts_root()
    found = []
    if not root.exists():
        return found
    for stage in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = [p for p in stage.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()]
        for v in sorted(versions, key=lambda p: int(p.name[1:])):
            try:
                found.append(open_artifact(v))
            except K2Error:
                continue
    return found


def lineage(art: Artifact, depth: int = 0, seen: set | None = None):
    """Yield (depth, artifact-or-missing-record) walking inputs back to the raw inputs."""
    seen = set() if seen is None else seen
    yield depth, art
    for inp in art.manifest.get("inputs", []):
        key = inp.get("path") or inp.get("id")
        if key in seen:
            continue
        seen.add(key)
        try:
            parent = open_artifact(inp["path"])
        except (K2Error, KeyError):
            yield depth + 1, inp  # a record of a parent that is gone
            continue
        yield from lineage(parent, depth + 1, seen)


# ----------------------------------------------------------------------------- writing


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _next_version(sdir: Path) -> int:
    taken = [int(p.name[1:]) for p in sdir.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]
    return max(taken, default=0) + 1


def _point_latest(sdir: Path, name: str) -> None:
    tmp = sdir / f".latest-{uuid.uuid4().hex[:8]}"
    os.symlink(name, tmp)
    os.replace(tmp, sdir / "latest")


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise K2Error(f"cannot write to {directory}: {e.strerror}", "choose a writable output location")


def fingerprint(stage: str, kind: str, recipe: dict, inputs: list) -> str:
    """What makes an output what it is: stage, kind, resolved recipe, exact inputs (their manifests)."""
    key = {"stage": stage, "kind": kind, "recipe": recipe,
           "inputs": sorted(sha256_file(a.path / MANIFEST) for a in inputs)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def versioned_dir(stage: str, out: str | None) -> Path | None:
    """Where `out` puts versions (`<root>/<out or stage>/`), or None when `out` is a plain directory."""
    if out is None or ("/" not in out and os.sep not in out and not Path(out).exists()):
        return stage_dir(out or stage)
    return None


def up_to_date(stage: str, kind: str, recipe: dict, inputs: list, out: str | None = None) -> Artifact | None:
    """The latest artifact of this output if it was made from the same recipe and inputs and is
    intact (what `k2 --reuse` skips to), else None. Only versioned outputs can be up to date."""
    parent = versioned_dir(stage, out)
    latest = parent / "latest" if parent is not None else None
    if latest is None or not latest.exists():
        return None
    try:
        art = open_artifact(parent / os.readlink(latest) if latest.is_symlink() else latest)  # vN, not "latest"
    except K2Error:
        return None
    if art.manifest.get("fingerprint") != fingerprint(stage, kind, recipe, inputs) or art.verify():
        return None
    return art


@dataclass
class ArtifactWriter:
    """Collects an artifact in a temporary directory, then renames it into place.

    Use as a context manager; files go under `writer.dir`. On success call `commit()`;
    on an exception the temporary directory is removed and nothing else is touched.

    `out` is None (next version under `<root>/<stage>/`), a bare name without a slash
    (next version under `<root>/<name>/`), or a directory path.
    """

    stage: str
    kind: str
    out: str | None = None
    recipe: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)  # list[Artifact]
    force: bool = False
    metrics: dict = field(default_factory=dict)
    data_split: dict | None = None  # a model's held-out documents (k2cli.lineage), recorded in the manifest
    dir: Path = field(init=False)

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        parent = versioned_dir(self.stage, self.out)
        if parent is not None:
            self._versioned = True
            self._parent = parent
            self._dest = None
        else:
            self._versioned = False
            self._dest = Path(self.out)
            if self._dest.exists() and (not self._dest.is_dir() or any(self._dest.iterdir())) and not self.force:
                raise K2Error(f"output {self._dest} exists and is not empty", "choose another --out or pass --force")
            self._parent = self._dest.resolve().parent
        _check_writable(self._parent)
        self.fingerprint = fingerprint(self.stage, self.kind, self.recipe, self.inputs)
        self.dir = self._parent / f".tmp-{self.stage}-{uuid.uuid4().hex[:10]}"
        self.dir.mkdir()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def commit(self, summary: str = "") -> Artifact:
        from k2cli import __version__

        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "stage": self.stage,
            "id": None,
            "version": None,
            "uid": uuid.uuid4().hex,
            "created": _now(),
            "k2cli_version": __version__,
            "git_commit": _git_commit(),
            "recipe": self.recipe,
            "inputs": [a.ref() for a in self.inputs],
            "metrics": self.metrics,
            "summary": summary,
            "fingerprint": self.fingerprint,
            "files": files,
        }
        if self.data_split is not None:
            manifest["data_split"] = self.data_split
        if self._versioned:
            # Pick the next free version; a concurrent writer that wins the race makes the
            # rename fail and we simply take the next number.
            for _ in range(100):
                n = _next_version(self._parent)
                dest = self._parent / f"v{n}"
                manifest["version"] = n
                manifest["id"] = f"{self._parent.name}/v{n}"
                (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                try:
                    os.rename(self.dir, dest)
                    break
                except OSError:
                    continue
            else:  # pragma: no cover
                raise K2Error(f"could not allocate a version under {self._parent}")
            _point_latest(self._parent, dest.name)
        else:
            dest = self._dest
            manifest["id"] = f"{self.stage}/{dest.name}-{manifest['uid'][:8]}"
            (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if dest.exists():  # empty directory, or --force
                old = dest.parent / f".old-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
                os.rename(self.dir, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.dir, dest)
        return Artifact(dest, manifest)
