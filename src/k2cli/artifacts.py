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
flushed to disk and renamed into place only when complete, so an interrupted stage never leaves a
half artifact and never touches the previous versions; the next writer removes what a killed one
left (`temp_name`, `stale_temps`; `k2 artifacts gc`).

Integrity: the manifest records every file's size and sha256, its inputs' manifest hashes, and its
own hash (`self_sha256`). Consumers check what they read (`Artifact.check`, cached hashes);
`k2 artifacts verify [--deep]` checks an artifact (and its whole lineage).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
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
            return _follow_latest(stage_dir(stage), ref)
        if not (version.startswith("v") and version[1:].isdigit()):
            raise K2Error(f"bad artifact reference '{ref}'", "use a path, 'stage:vN' or 'stage:latest'")
        return stage_dir(stage) / version
    return Path(ref)


def _follow_latest(sdir: Path, ref: str) -> Path:
    """<stage>/latest -> vN, with what is wrong said precisely: no versions, a dangling or a looping link."""
    link = sdir / "latest"
    if not os.path.lexists(link):
        raise K2Error(f"no artifact '{ref}': {sdir} has no versions yet", f"run the '{sdir.name}' stage first, or pass a path")
    if not link.is_symlink():
        return link
    target = os.readlink(link)
    try:
        (sdir / target).resolve(strict=True)
    except RuntimeError:  # Python < 3.13: a symlink loop
        raise K2Error(f"{link} is a symlink loop (-> {target})", f"point it at a version: ln -sfn vN {link}") from None
    except OSError as e:  # missing target, or ELOOP on newer Pythons
        what = "a symlink loop" if e.errno == errno.ELOOP else "dangling"
        raise K2Error(f"{link} is {what} (-> {target})",
                      f"point it at an existing version (ln -sfn vN {link}), or re-run the '{sdir.name}' stage") from None
    return sdir / target


# ----------------------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Consumers verify the files they open on every load; re-hashing a large model each time would cost seconds,
# so a file's hash is remembered by what identifies its bytes short of reading them: (path, device, inode,
# size, mtime, ctime), once the file has settled (`RACY_S`). ctime cannot be set from user space (touch sets mtime only), so any write to the file
# after it was hashed changes the key. In memory for the process, and in <root>/.cache/verified.json for the
# next one (a cache a user could forge, but one who can write there can rewrite the manifest too).
_hashes: dict[str, str] = {}
_loaded_caches: set[Path] = set()
_dirty = False  # hashes taken since the cache file was last written
VERIFY_CACHE = Path(".cache") / "verified.json"
VERIFY_CACHE_ENTRIES = 20000


RACY_S = 2.0  # a file changed this recently may change again within the same timestamp tick: never cached


def _stat_key(path: Path) -> tuple[str, bool]:
    """(the cache key of `path`, whether a hash taken now may be cached). Timestamps advance in ticks (a few
    ms), so a write in the same tick as the hashing would keep the key: like git's "racily clean" index
    entries, a file modified in the last RACY_S seconds is hashed every time until it has settled."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    return key, time.time() - max(st.st_mtime, st.st_ctime) >= RACY_S


def _cache_file() -> Path:
    return artifacts_root() / VERIFY_CACHE


def _load_hash_cache() -> None:
    path = _cache_file()
    if path in _loaded_caches:
        return
    _loaded_caches.add(path)
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict):
            _hashes.update({k: v for k, v in saved.items() if isinstance(v, str)})
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: hash again


def _save_hash_cache() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / temp_name(".tmp-verified")
        tmp.write_text(json.dumps(dict(list(_hashes.items())[-VERIFY_CACHE_ENTRIES:])))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only root: the in-memory cache still holds for this process


def sha256_cached(path: Path) -> str:
    """sha256 of `path`, read only when its (inode, size, mtime, ctime) changed since it was last hashed."""
    global _dirty
    _load_hash_cache()
    key, settled = _stat_key(path)
    if key in _hashes:
        return _hashes[key]
    digest = sha256_file(path)
    if settled:
        _hashes[key] = digest
        _dirty = True
    return digest


def _flush_hash_cache() -> None:
    global _dirty
    if _dirty:
        _dirty = False
        _save_hash_cache()


def manifest_self_sha256(manifest: dict) -> str:
    """The hash a manifest records of itself (every key but this one, canonical JSON): a file hash rewritten in
    place is caught even for an artifact nobody records as an input."""
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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

    def verify(self, parts=None, cached: bool = False, manifest: bool = True) -> list[str]:
        """One line per problem (empty when intact): each file's size and sha256 against the manifest, and
        the manifest against its own recorded hash (`manifest`). `parts`: only these files or directories
        (`corpus` covers corpus/...), as a consumer checks what it opens; `cached`: trust a hash taken of the
        very same file (inode, size, mtime, ctime) before (`sha256_cached`)."""
        problems = []
        recorded = self.manifest.get("self_sha256")
        if manifest and recorded and recorded != manifest_self_sha256(self.manifest):
            problems.append(f"{MANIFEST}: edited after the artifact was written (its recorded hash does not match)")
        wanted = None if parts is None else [str(p).rstrip("/") for p in parts]
        hash_of = sha256_cached if cached else sha256_file
        for name, info in self.manifest.get("files", {}).items():
            if wanted is not None and not any(name == w or name.startswith(w + "/") for w in wanted):
                continue
            p = self.path / name
            try:
                if not p.is_file():
                    problems.append(f"{name}: missing")
                elif p.stat().st_size != info.get("bytes", p.stat().st_size):
                    problems.append(f"{name}: sha256 mismatch ({p.stat().st_size} bytes, the manifest says {info['bytes']}: "
                                    "file was changed after the artifact was written)")
                elif hash_of(p) != info["sha256"]:
                    problems.append(f"{name}: sha256 mismatch (file was changed after the artifact was written)")
            except OSError as e:
                problems.append(f"{name}: cannot read ({e.strerror})")
        if cached:
            _flush_hash_cache()
        return problems

    def check(self, *parts) -> "Artifact":
        """Verify the files a consumer is about to read (all of them without `parts`), cheaply (cached
        hashes); a K2Error naming the first damaged file. Returns the artifact."""
        problems = self.verify(parts or None, cached=True, manifest=False)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise K2Error(f"{self.id} failed verification: {problems[0]}{more}",
                          "the artifact is damaged; re-run the stage that made it")
        return self


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
    except OSError as e:
        raise K2Error(f"cannot read {mpath}: {e.strerror}", "check its permissions (and the disk)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"corrupt manifest {mpath}: {e}", "the artifact is damaged; re-run the stage that made it")
    if not isinstance(manifest, dict):
        raise K2Error(f"corrupt manifest {mpath}: a JSON {type(manifest).__name__}, not an object",
                      "the artifact is damaged; re-run the stage that made it")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise K2Error(
            f"{path}: unknown artifact schema version {version!r} (this k2 reads version {SCHEMA_VERSION})",
            "re-create the artifact with this k2 version",
        )
    for key in ("kind", "stage", "id", "files"):
        if key not in manifest:
            raise K2Error(f"corrupt manifest {mpath}: no '{key}'", "re-run the stage that made it")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in files.values()):
        raise K2Error(f"corrupt manifest {mpath}: 'files' must map each name to its sha256 and bytes",
                      "the artifact is damaged; re-run the stage that made it")
    if not all(isinstance(manifest[k], str) for k in ("kind", "stage", "id")) or not isinstance(manifest.get("inputs", []), list):
        raise K2Error(f"corrupt manifest {mpath}: kind, stage and id must be strings, inputs a list",
                      "the artifact is damaged; re-run the stage that made it")
    art = Artifact(path, manifest)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else kind
        if art.kind not in kinds:
            raise K2Error(
                f"{ref} is a {art.kind} artifact, expected {' or '.join(kinds)}",
                f"pass a {kinds[0]} artifact",
            )
    if verify:  # every file re-hashed (the manifest's own hash is `k2 artifacts verify`'s question)
        problems = art.verify(manifest=False)
        if problems:
            raise K2Error(f"{ref} failed verification: {problems[0]}", "re-run the stage that made it")
    return art


def scan_artifacts() -> list[tuple[Path, Artifact | None, str]]:
    """Every version directory under the root, oldest first: (path, artifact, "") when it opens, else
    (path, None, what is wrong), so a damaged artifact is listed rather than silently left out."""
    root = artifacts_root()
    found = []
    if not root.is_dir():
        return found
    for stage in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            versions = [p for p in stage.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()]
        except OSError:
            continue
        for v in sorted(versions, key=lambda p: int(p.name[1:])):
            try:
                found.append((v, open_artifact(v), ""))
            except K2Error as e:
                found.append((v, None, e.message))
    return found


def list_artifacts() -> list[Artifact]:
    return [a for _, a, _ in scan_artifacts() if a is not None]


def lineage(art: Artifact, depth: int = 0, seen: set | None = None):
    """Yield (depth, artifact-or-missing-record) walking inputs back to the raw inputs."""
    seen = set() if seen is None else seen
    yield depth, art
    for inp in art.manifest.get("inputs", []):
        key = inp.get("path") or inp.get("id") if isinstance(inp, dict) else None
        if key in seen:
            continue
        seen.add(key)
        try:
            parent = open_artifact(inp["path"])
        except (K2Error, KeyError, TypeError):
            yield depth + 1, inp if isinstance(inp, dict) else {"id": str(inp)}  # a record of a parent that is gone
            continue
        yield from lineage(parent, depth + 1, seen)


def verify_lineage(art: Artifact) -> list[str]:
    """`k2 artifacts verify --deep`: every artifact up the lineage is intact (files and manifest), and each
    input is still the artifact its child was made from (the manifest hash the child recorded)."""
    problems, seen = [], set()

    def walk(node: Artifact):
        if str(node.path.resolve()) in seen:
            return
        seen.add(str(node.path.resolve()))
        problems.extend(f"{node.id}: {p}" for p in node.verify())
        for inp in node.manifest.get("inputs", []):
            if not isinstance(inp, dict) or "path" not in inp:
                problems.append(f"{node.id}: an input record without a path ({str(inp)[:80]})")
                continue
            try:
                parent = open_artifact(inp["path"])
            except K2Error as e:
                problems.append(f"{node.id}: its input {inp.get('id')} is gone or unreadable ({e.message})")
                continue
            recorded = inp.get("manifest_sha256")
            if recorded and sha256_file(parent.path / MANIFEST) != recorded:
                problems.append(f"{node.id}: its input {parent.id} was changed after {node.id} was made from it "
                                f"({MANIFEST} hash differs from the one recorded)")
            walk(parent)

    walk(art)
    return problems


# ----------------------------------------------------------------------------- leftovers of dead processes

# Temporary entries (`.tmp-*` artifact directories, `.tmp-step-*` checkpoints, `.latest-*` links, `.old-*`) carry
# their owner in the name, `<prefix>-<random>@<pid>@<host>`: one whose process is gone on this host is stale and
# removed by the next writer in the same directory, or by `k2 artifacts gc`. Another host's entry (shared storage)
# and one named by an older k2 (no owner recorded) are stale only when old.
TEMP_PREFIXES = (".tmp-", ".old-", ".latest-", ".probe-")
FOREIGN_STALE_S = 24 * 3600
LEGACY_STALE_S = 3600


def temp_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(path: Path, legacy: bool = True) -> bool:
    """Whether `path` (a temporary entry) belongs to a process that is gone. `legacy`: also an entry named
    without an owner once it is old (only in k2's own directories, never in a user's --out parent)."""
    parts = path.name.split("@")
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    if len(parts) == 3 and parts[1].isdigit():
        if parts[2] == socket.gethostname():
            return int(parts[1]) != os.getpid() and not _alive(int(parts[1]))
        return age > FOREIGN_STALE_S
    return legacy and age > LEGACY_STALE_S


def stale_temps(directory: Path, legacy: bool = True) -> list[Path]:
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(TEMP_PREFIXES) and is_stale(p, legacy))


def remove_temps(paths) -> list[Path]:
    removed = []
    for p in paths:
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass  # gone already (another process cleaned it), or not ours to remove
    return removed


def temp_dirs(root: Path | None = None) -> list[Path]:
    """The directories k2 writes temporaries in: each stage directory, each run's checkpoints/, and the caches
    (<root>/cache/<kind>/, e.g. the token cache)."""
    root = artifacts_root() if root is None else Path(root)
    dirs = []
    if root.is_dir():
        for sdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            dirs.append(sdir)
            runs = sdir / "runs"
            if runs.is_dir():
                dirs += sorted(r / "checkpoints" for r in runs.iterdir() if (r / "checkpoints").is_dir())
        if (root / "cache").is_dir():
            dirs += sorted(p for p in (root / "cache").iterdir() if p.is_dir() and not p.is_symlink())
    return dirs


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the directories, so that a rename that publishes it is
    never followed (after a power loss) by empty files inside a committed artifact or checkpoint."""
    directory = Path(directory)
    for p in sorted(directory.rglob("*"), reverse=True):  # files before the directories that hold them
        if p.is_symlink():
            continue
        fsync_path(p)
    fsync_path(directory)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")  # fine enough that "oldest first" has no ties


def _next_version(sdir: Path) -> int:
    taken = [int(p.name[1:]) for p in sdir.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]
    return max(taken, default=0) + 1


def _point_latest(sdir: Path, name: str) -> None:
    tmp = sdir / temp_name(".latest")
    os.symlink(name, tmp)
    os.replace(tmp, sdir / "latest")
    fsync_path(sdir)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / temp_name(".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise K2Error(f"cannot write to {directory}: {e.strerror}",
                      "free disk space, fix the permissions, or choose another artifacts root (k2 --root DIR)") from None


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
        remove_temps(stale_temps(self._parent, legacy=self._versioned))  # what a killed writer left here
        self.fingerprint = fingerprint(self.stage, self.kind, self.recipe, self.inputs)
        self.dir = self._parent / temp_name(f".tmp-{self.stage}")
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
                written = self._write_manifest(manifest)
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
            written = self._write_manifest(manifest)
            if dest.exists():  # empty directory, or --force
                old = dest.parent / temp_name(".old")
                os.rename(dest, old)
                os.rename(self.dir, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.dir, dest)
            fsync_path(dest.parent)
        return Artifact(dest, written)

    def _write_manifest(self, manifest: dict) -> dict:
        """manifest.json with its own hash, then every file flushed to disk before the rename publishes them."""
        manifest = json.loads(json.dumps(manifest))  # exactly what a reader will load (tuples -> lists, ...)
        manifest.pop("self_sha256", None)
        manifest["self_sha256"] = manifest_self_sha256(manifest)
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(self.dir)
        return manifest
