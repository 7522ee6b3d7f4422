"""Stage outputs: content-addressed folders, written atomically, described by a manifest.

Every stage writes under `<workdir>/<stage>/<key>/`, where `key` digests the stage's code
version, its config slice and the digests of its input manifests. A stage whose folder
already holds a manifest is a cache hit; otherwise it builds into a temporary folder that
is renamed into place only when complete, so a crash never leaves a folder that looks done.

A manifest is a small JSON record (paths, row counts, schema, content digests, metrics):
the only thing stages pass to each other. Pure Python: no Prefect, no MLflow here.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.schema import config_digest
from tasks.errors import ConfigError, StageInputError

Manifest = dict[str, Any]
MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


DIGEST_PIECE = 1 << 26  # 64 MiB


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes; of a file larger than one piece (a stage's split arrays),
    the sha256 of its pieces' sha256s in order, the pieces hashed side by side by threads
    (hashlib lets go of the GIL): one core hashes 1.7 GB/s, and ingest's driver spent 4.6
    s of a 4 GiB CSV's stage on the split arrays' digests while the workers stood idle
    (2.5 s with pieces: benchmarks/README.md, run H)."""
    size = os.path.getsize(path)
    if size <= DIGEST_PIECE:
        return _piece_digest(path, 0).hexdigest()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        pieces = pool.map(
            lambda start: _piece_digest(path, start).digest(), range(0, size, DIGEST_PIECE)
        )
        return hashlib.sha256(b"".join(pieces)).hexdigest()


def _piece_digest(path: str | Path, start: int, chunk: int = 1 << 22):
    """The sha256 of the DIGEST_PIECE bytes (or fewer, at the end) from `start`."""
    h = hashlib.sha256()  # hardware-accelerated here: 1.7 GB/s against blake2b's 0.6
    with open(path, "rb") as fh:
        fh.seek(start)
        left = DIGEST_PIECE
        while left and (block := fh.read(min(chunk, left))):
            h.update(block)
            left -= len(block)
    return h


def describe_files(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size and content digest of each file, for a manifest."""
    return [{"path": str(p), "bytes": p.stat().st_size, "digest": file_digest(p)} for p in paths]


def files_digest(files: list[dict[str, Any]]) -> str:
    """One digest over a set of described files (every file's content digest, in order):
    the dataset identity that lineage and the champion gate compare."""
    return config_digest([f["digest"] for f in files])


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class StageOutcome:
    manifest: Manifest
    cached: bool
    reason: str
    seconds: float


@dataclass
class StageDir:
    """Where a build writes (`tmp`) and where its files will live once complete (`final`)."""

    tmp: Path
    final: Path

    def path(self, name: str) -> Path:
        return self.tmp / name

    def final_path(self, name: str) -> str:
        return str(self.final / name)

    def moved(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A file described in `tmp` (here or on a worker), with the path it will have."""
        return {**entry, "path": self.final_path(str(Path(entry["path"]).relative_to(self.tmp)))}

    def describe(self, *names: str) -> list[dict[str, Any]]:
        """Describe files written in `tmp` (size, digest) under their final paths."""
        return [self.moved(entry) for entry in describe_files([self.path(n) for n in names])]


# a dotted name in a string ("tasks.training.worker") may be a module started by name
# (`python -m ...`, torchrun): code the stage runs, though never imported
DOTTED_NAME = re.compile(r"^\w+(?:\.\w+)+$")


def project_packages(root: Path) -> set[str]:
    """The project's top-level packages: folders under `root` with an __init__.py."""
    return {p.parent.name for p in root.glob("*/__init__.py")}


def module_file(name: str, root: Path) -> Path | None:
    """The source file of project module `name` under `root`, or None when it has none."""
    path = root.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(name: str, path: Path, packages: set[str]) -> set[str]:
    """Project modules that module `name` (source at `path`) imports anywhere in its body
    (lazy imports inside functions and TYPE_CHECKING blocks included) or starts by name."""
    is_package = path.name == "__init__.py"
    return _imported_modules(name, is_package, path.read_text(), frozenset(packages))


# Keyed by the source text itself, so an edit is always seen: every stage's closure walks
# most of the same modules, and parsing them was 2.2 s of CPU per pipeline run.
@functools.lru_cache(maxsize=1024)
def _imported_modules(
    name: str, is_package: bool, source: str, packages: frozenset[str]
) -> frozenset[str]:
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: counted from the importing module's package
                parts = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # from pkg import mod
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DOTTED_NAME.match(node.value)
        ):
            found.add(node.value)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    with_parents = {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}
    return frozenset(n for n in with_parents if n.split(".")[0] in packages)


def import_closure(module: str, root: Path | None = None) -> dict[str, Path]:
    """Every project module `module` runs: itself and, transitively, what it imports or starts
    by name, found by reading the source under `root` (the project's; nothing is imported)."""
    root = root or PROJECT_ROOT
    packages = project_packages(root)
    closure: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        path = module_file(name, root)
        if path is None:  # `from tasks.x import function`: a name, not a module
            continue
        closure[name] = path
        pending.extend(imported_modules(name, path, packages) - closure.keys())
    if module not in closure:
        raise RuntimeError(f"stage module {module} not found under {root}")
    return closure


def code_version(module: str, root: Path | None = None) -> str:
    """A digest of the source of every project module a stage runs (its import closure), so a
    stage's cache cannot outlive its code: edit one byte of anything it imports and the stage,
    and every stage after it, runs again. Derived from the imports: no list to keep."""
    h = hashlib.sha256()
    for name, path in sorted(import_closure(module, root).items()):
        h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def check_workdir(workdir: str | Path) -> Path:
    """The workdir as a folder we can write, created if missing; else a ConfigError."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"workdir {path} is a file, not a folder; set workdir to a folder (created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"workdir {path}: cannot create it ({exc.strerror}); set workdir "
            "to a folder you can write"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {path} is not writable; set workdir to a folder you can write")
    return path


def stage_key(stage: str, version: str, config: dict[str, Any], inputs: list[Manifest]) -> str:
    return config_digest(
        {
            "stage": stage,
            "version": version,
            "config": config,
            "inputs": [m["digest"] for m in inputs],
        }
    )


def why_it_ran(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """Say in words what differs from the last completed run of this stage."""
    if previous is None:
        return "first run of this stage in this workdir"
    changes = []
    if previous.get("version") != current["version"]:
        changes.append(f"stage code changed ({previous.get('version')} → {current['version']})")
    old_cfg, new_cfg = previous.get("config", {}), current["config"]
    changed_keys = sorted(
        k for k in old_cfg.keys() | new_cfg.keys() if old_cfg.get(k) != new_cfg.get(k)
    )
    if changed_keys:
        changes.append("config changed: " + ", ".join(changed_keys))
    if previous.get("inputs") != current["inputs"]:
        changes.append("input changed: " + ", ".join(sorted(current["input_stages"])))
    return "; ".join(changes) or "output for this key was not found (removed?)"


def run_stage(
    workdir: str | Path,
    stage: str,
    version: str,
    config: dict[str, Any],
    inputs: list[Manifest],
    build: Callable[[StageDir], Manifest],
    resumable: bool = False,
) -> StageOutcome:
    """Return the stage's manifest, building it only when no complete output exists.

    `build` writes its files into `StageDir.tmp` and returns the manifest body. With
    `resumable=True` the temporary folder has a stable name, so a killed run (training)
    can pick up its checkpoints next time instead of starting over.
    """
    start = time.perf_counter()
    root = Path(workdir).resolve() / stage
    key = stage_key(stage, version, config, inputs)
    final = root / key
    for upstream in inputs:
        problem = damaged(upstream)
        if problem:
            raise StageInputError(
                f"{stage}: input from stage '{upstream['stage']}' is damaged ({problem}); delete "
                f"{upstream['dir']} and run again to rebuild it"
            )
    outcome, damage = cached_outcome(final, key, start)
    if outcome:
        return outcome
    root.mkdir(parents=True, exist_ok=True)
    with stage_lock(root, key) as waited:
        # look again under the lock: another run may have built this very key while we
        # waited, or between our first look and taking the lock (a fast stage): take theirs
        outcome, damaged_now = cached_outcome(final, key, start)
        if outcome:
            outcome.reason += ", built by another run" + (
                " while this one waited" if waited else ""
            )
            return outcome
        damage = damage or damaged_now  # (the first look already set a damaged output aside)
        record = {
            "version": version,
            "config": config,
            "inputs": [m["digest"] for m in inputs],
            "input_stages": [m["stage"] for m in inputs],
        }
        last_path = root / "last.json"
        previous = json.loads(last_path.read_text()) if last_path.is_file() else None
        reason = (
            f"cached output was damaged ({damage}); rebuilt"
            if damage
            else why_it_ran(previous, record)
        )

        sweep_abandoned(root)
        tmp = root / (
            f".partial-{key}" if resumable else f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        tmp.mkdir(exist_ok=True)
        try:
            body = build(StageDir(tmp=tmp, final=final))
        except BaseException:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = {
            **body,
            "stage": stage,
            "key": key,
            "version": version,
            "config": config,
            "inputs": record["inputs"],
            "dir": str(final),
        }
        manifest["digest"] = config_digest({"key": key, "files": _file_digests(manifest)})
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():  # another run finished the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = json.loads((final / MANIFEST).read_text())
        else:
            os.replace(tmp, final)
        write_json_atomic(last_path, {**record, "key": key})
        return StageOutcome(manifest, False, reason, time.perf_counter() - start)


def cached_outcome(final: Path, key: str, start: float) -> tuple[StageOutcome | None, str | None]:
    """A cache hit for a complete, undamaged output; else (None, what was damaged)."""
    if not (final / MANIFEST).is_file():
        return None, None
    manifest = json.loads((final / MANIFEST).read_text())
    damage = damaged(manifest)
    if not damage:
        return StageOutcome(manifest, True, f"cache hit ({key})", time.perf_counter() - start), None
    shutil.rmtree(final)  # a file was removed or truncated by hand: rebuild, don't trust it
    return None, damage


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[bool]:
    """An exclusive lock across processes (flock on `path`, released by the kernel if the
    holder dies). Yields whether it had to wait; prints `waiting` when it does."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_lock(root: Path, key: str):
    """One builder per stage key across processes: two runs on one workdir never build (or
    resume training into) the same folder at once; the second waits, then finds the first's
    output. Lock files live apart from the stage folders: nothing there to sweep."""
    return file_lock(
        root.parent / ".locks" / f"{root.name}-{key}",
        f"{root.name}: another run is building {key}; waiting for it",
    )


def sweep_abandoned(root: Path) -> None:
    """Remove temporary folders of builds whose process is gone (killed mid-write). They
    never looked complete; this only reclaims their space. Live builds are left alone."""
    for tmp in root.glob(".tmp-*"):
        try:
            pid = int(tmp.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def damaged(manifest: Manifest) -> str | None:
    """A cheap integrity check (existence and size of every described file), or None."""
    for entry in _described(manifest):
        path = Path(entry["path"])
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {entry['bytes']}"
    return None


def _described(node: Any) -> list[dict[str, Any]]:
    """Every described file ({path, bytes, digest}) anywhere in a manifest body."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if {"path", "bytes", "digest"} <= node.keys():
            found.append(node)
        for value in node.values():
            found.extend(_described(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_described(value))
    return found


def _file_digests(node: Any) -> list[str]:
    return [entry["digest"] for entry in _described(node)]
