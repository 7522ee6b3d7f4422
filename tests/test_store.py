"""Stage folders: cache hits, reasons for re-running, atomic outputs."""

import json
import time

import pytest

from tasks import store
from tasks.store import StageInputError, files_digest, run_stage


def build_ok(out):
    out.path("data.txt").write_text("hello")
    return {"value": 1, "metrics": {}}


def test_second_run_is_a_cache_hit_and_a_config_change_says_what_changed(tmp_path):
    first = run_stage(tmp_path, "demo", "1", {"a": 1, "b": 2}, [], build_ok)
    assert not first.cached and "first run" in first.reason
    again = run_stage(
        tmp_path, "demo", "1", {"a": 1, "b": 2}, [], lambda out: pytest.fail("must not rebuild")
    )
    assert again.cached and again.manifest["digest"] == first.manifest["digest"]
    changed = run_stage(tmp_path, "demo", "1", {"a": 1, "b": 3}, [], build_ok)
    assert not changed.cached and "config changed: b" in changed.reason
    bumped = run_stage(tmp_path, "demo", "2", {"a": 1, "b": 3}, [], build_ok)
    assert "stage code changed (1 → 2)" in bumped.reason


def test_a_large_file_is_digested_by_pieces_and_a_small_one_whole(tmp_path, monkeypatch):
    """A file over one piece: the sha256 of its pieces' sha256s, hashed side by side; one
    that fits in a piece: its plain sha256, as before pieces existed."""
    import hashlib

    monkeypatch.setattr(store, "DIGEST_PIECE", 1000)
    data = bytes(range(256)) * 14  # 3,584 bytes: three whole pieces and a part
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(data)
    small.write_bytes(data[:1000])
    pieces = b"".join(hashlib.sha256(data[i : i + 1000]).digest() for i in range(0, 3584, 1000))
    assert store.file_digest(big) == hashlib.sha256(pieces).hexdigest()
    assert store.file_digest(small) == hashlib.sha256(data[:1000]).hexdigest()
    big.write_bytes(data[:-1] + b"!")  # one byte of the last piece
    assert store.file_digest(big) != hashlib.sha256(pieces).hexdigest()


def test_input_change_reruns_downstream(tmp_path):
    up = run_stage(tmp_path, "up", "1", {"x": 1}, [], build_ok)
    down = run_stage(tmp_path, "down", "1", {}, [up.manifest], build_ok)
    up2 = run_stage(tmp_path, "up", "1", {"x": 2}, [], build_ok)
    down2 = run_stage(tmp_path, "down", "1", {}, [up2.manifest], build_ok)
    assert not down2.cached and "input changed: up" in down2.reason
    assert down2.manifest["key"] != down.manifest["key"]


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    def crash(out):
        out.path("half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "demo", "1", {"a": 1}, [], crash)
    assert [
        p.name for p in (tmp_path / "demo").iterdir()
    ] == []  # tmp folder removed, no key folder
    ok = run_stage(tmp_path, "demo", "1", {"a": 1}, [], build_ok)
    assert not ok.cached and json.loads(
        (tmp_path / "demo" / ok.manifest["key"] / "manifest.json").read_text()
    )


def test_resumable_stage_keeps_its_partial_folder(tmp_path):
    def crash(out):
        out.path("checkpoint.pt").write_text("epoch 3")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "train", "1", {}, [], crash, resumable=True)
    partial = [p for p in (tmp_path / "train").iterdir()]
    assert len(partial) == 1 and partial[0].name.startswith(".partial-")

    def resume(out):
        assert out.path("checkpoint.pt").read_text() == "epoch 3"
        return {"resumed": True}

    done = run_stage(tmp_path, "train", "1", {}, [], resume, resumable=True)
    assert done.manifest["resumed"] and not any(
        p.name.startswith(".partial") for p in (tmp_path / "train").iterdir()
    )


def build_described(out):
    from tasks.store import describe_files

    out.path("data.bin").write_bytes(b"x" * 64)
    entry = describe_files([out.path("data.bin")])[0] | {"path": out.final_path("data.bin")}
    return {"file": entry}


def test_damaged_cached_output_is_rebuilt_and_damaged_input_is_named(tmp_path):
    from pathlib import Path

    first = run_stage(tmp_path, "up", "1", {}, [], build_described)
    Path(first.manifest["file"]["path"]).write_bytes(b"truncated")
    again = run_stage(tmp_path, "up", "1", {}, [], build_described)
    assert not again.cached and "damaged" in again.reason and "expected 64" in again.reason
    Path(again.manifest["file"]["path"]).unlink()
    with pytest.raises(
        StageInputError, match=r"input from stage 'up' is damaged .*data\.bin is missing"
    ):
        run_stage(tmp_path, "down", "1", {}, [again.manifest], build_ok)


def test_a_dataset_digest_covers_every_file_not_only_the_first():
    a, b, c = ({"path": f"/x/{n}", "bytes": 1, "digest": n * 64} for n in "abc")
    assert files_digest([a, b]) != files_digest([a, c])  # only the second file differs
    assert files_digest([a, b]) != files_digest([b, a]) and files_digest([a, b]) == files_digest(
        [a, b]
    )


def _slow_build(workdir, started):
    def build(out):
        started.set()
        time.sleep(1.5)
        out.path("data.txt").write_text("built once")
        return {"metrics": {}}

    run_stage(workdir, "demo", "1", {"a": 1}, [], build)


def test_two_runs_on_one_workdir_build_a_stage_once(tmp_path):
    """The second run waits on the stage's lock, then takes the first's output: never two
    builders in one folder, never a half-visible stage."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    first = ctx.Process(target=_slow_build, args=(tmp_path, started))
    first.start()
    assert started.wait(30)
    second = run_stage(tmp_path, "demo", "1", {"a": 1}, [], lambda out: pytest.fail("built twice"))
    first.join(30)
    assert first.exitcode == 0
    assert second.cached and "built by another run while this one waited" in second.reason
    assert (tmp_path / "demo" / second.manifest["key"] / "data.txt").read_text() == "built once"


def test_a_stage_s_code_version_is_the_digest_of_its_import_closure(tmp_path):
    """Found by reading imports (top-level, lazy, relative, and a worker started by name):
    a byte changed in any of them changes the digest; a module the stage never reaches does not."""
    from tasks.store import code_version, import_closure

    files = {
        "demo/__init__.py": "",
        "demo/stage.py": "from demo import launch\n",
        "demo/launch.py": 'CMD = ["torchrun", "-m", "demo.worker.main"]\n',
        "demo/worker/__init__.py": "",
        "demo/worker/main.py": "def run():\n    from .optim import step\n",
        "demo/worker/optim.py": "LR = 1\n",
        "demo/unrelated.py": "X = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert set(import_closure("demo.stage", tmp_path)) == {
        "demo",
        "demo.stage",
        "demo.launch",
        "demo.worker",
        "demo.worker.main",
        "demo.worker.optim",
    }
    before = code_version("demo.stage", tmp_path)
    (tmp_path / "demo/unrelated.py").write_text("X = 2\n")
    assert code_version("demo.stage", tmp_path) == before
    (tmp_path / "demo/worker/optim.py").write_text("LR = 2\n")
    assert code_version("demo.stage", tmp_path) != before
    with pytest.raises(RuntimeError, match="demo.missing"):
        code_version("demo.missing", tmp_path)
