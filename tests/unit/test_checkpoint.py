"""The checkpoint file contract: atomic writes, manifests, SIGKILL mid-write, corruption, pruning."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpc_jobs.checkpoint import (CheckpointError, Manifest, latest_complete, link_checkpoint, load_checkpoint,
                                 manifest_path, prune, read_manifest, save_checkpoint, verify_checkpoint)

REPO = Path(__file__).resolve().parents[2]

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((64, 64), value), "b": torch.arange(10.0)}, "step": int(value)}


def test_save_writes_data_then_manifest_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "step-00000001.pt"
    manifest = save_checkpoint(path, _state(), step=1, epoch=0, metrics={"loss": 0.5}, meta={"why": "test"})
    assert isinstance(manifest, Manifest)
    on_disk = json.loads(manifest_path(path).read_text())
    assert on_disk["format"] == 1 and on_disk["file"] == path.name
    assert on_disk["size"] == path.stat().st_size and len(on_disk["sha256"]) == 64
    assert on_disk["step"] == 1 and on_disk["metrics"] == {"loss": 0.5} and on_disk["meta"] == {"why": "test"}
    assert verify_checkpoint(path) == manifest == verify_checkpoint(path, quick=True)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], _state()["model"]["w"])
    assert not list(tmp_path.glob("*.tmp-*")), "temporary files left behind"


def test_missing_manifest_and_missing_file_are_clear(tmp_path: Path) -> None:
    good = tmp_path / "step-00000001.pt"
    save_checkpoint(good, _state(1), step=1, epoch=0)
    half = tmp_path / "step-00000002.pt"
    torch.save(_state(2), half)  # data without manifest: a writer killed before its manifest
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(half)
    msg = str(err.value)
    assert "incomplete checkpoint" in msg and "killed" in msg and str(good) in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        verify_checkpoint(tmp_path / "nope.pt")
    manifest_path(half).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        verify_checkpoint(half)
    assert latest_complete(tmp_path) == good


def test_flipped_byte_fails_full_verify_with_clear_message(tmp_path: Path) -> None:
    old = tmp_path / "step-00000001.pt"
    save_checkpoint(old, _state(1), step=1, epoch=0)
    path = tmp_path / "step-00000002.pt"
    save_checkpoint(path, _state(2), step=2, epoch=0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    verify_checkpoint(path, quick=True)  # same size: quick mode cannot tell
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    assert "corrupt checkpoint" in str(err.value) and "sha256" in str(err.value)
    assert f"previous checkpoint {old} is still usable" in str(err.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert latest_complete(tmp_path) == old
    truncated = tmp_path / "step-00000003.pt"
    save_checkpoint(truncated, _state(3), step=3, epoch=0)
    with open(truncated, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="incomplete checkpoint .* bytes on disk"):
        verify_checkpoint(truncated, quick=True)


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    import hpc_jobs.checkpoint as ck
    target, phase = sys.argv[1], sys.argv[2]
    ck.save_checkpoint(os.path.join(target, "step-00000001.pt"), {"w": torch.ones(1000)}, step=1, epoch=0)
    if phase == "data":  # stall in the middle of torch.save's bytes
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.seek(f.tell() // 2); f.truncate(); f.flush()
            print("WRITING", flush=True); time.sleep(60)
        torch.save = slow_save
    else:  # stall after the data file is in place, before its manifest
        def slow_manifest(path, manifest):
            print("WRITING", flush=True); time.sleep(60)
        ck._write_manifest = slow_manifest
    ck.save_checkpoint(os.path.join(target, "step-00000002.pt"), {"w": torch.zeros(1000)}, step=2, epoch=0)
""")


@pytest.mark.parametrize("phase", ["data", "manifest"])
def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path: Path, phase: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), phase], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first, second = tmp_path / "step-00000001.pt", tmp_path / "step-00000002.pt"
    assert second.exists() == (phase == "manifest")  # killed before or after the rename
    assert latest_complete(tmp_path) == first
    assert torch.equal(load_checkpoint(first)["w"], torch.ones(1000))
    if phase == "manifest":
        with pytest.raises(CheckpointError, match="incomplete checkpoint"):
            verify_checkpoint(second)
    # the next save cleans the dead writer's temporary file up and the new one wins
    save_checkpoint(tmp_path / "step-00000003.pt", {"w": torch.ones(3)}, step=3, epoch=0)
    prune(tmp_path, keep=2)
    assert not list(tmp_path.glob("*.tmp-*"))
    assert latest_complete(tmp_path) == tmp_path / "step-00000003.pt"


def test_prune_keeps_newest_and_best_and_waits_for_a_complete_one(tmp_path: Path) -> None:
    paths = []
    for step in range(1, 6):
        p = tmp_path / f"step-{step:08d}.pt"
        save_checkpoint(p, _state(step), step=step, epoch=0)
        paths.append(p)
        if step == 2:
            link_checkpoint(p, tmp_path / "best.pt")
    incomplete = tmp_path / "step-00000006.pt"  # newer but incomplete: must not count
    torch.save(_state(6), incomplete)
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [p.name for p in paths[:3]]
    assert not manifest_path(paths[0]).exists()
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert incomplete.exists()
    best = verify_checkpoint(tmp_path / "best.pt")
    assert best.step == 2 and best.file == "best.pt"
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], _state(2)["model"]["w"])
    assert latest_complete(tmp_path) == paths[-1]
    # nothing complete yet: nothing removed
    empty = tmp_path / "other"
    empty.mkdir()
    torch.save(_state(1), empty / "step-00000001.pt")
    assert prune(empty, keep=1) == [] and (empty / "step-00000001.pt").exists()


def test_link_overwrite_never_leaves_a_stale_manifest(tmp_path: Path) -> None:
    a, b = tmp_path / "step-00000001.pt", tmp_path / "step-00000002.pt"
    save_checkpoint(a, _state(1), step=1, epoch=0)
    save_checkpoint(b, _state(2), step=2, epoch=0)
    link_checkpoint(a, tmp_path / "best.pt")
    link_checkpoint(b, tmp_path / "best.pt")
    assert read_manifest(tmp_path / "best.pt").step == 2
    assert verify_checkpoint(tmp_path / "best.pt").sha256 == verify_checkpoint(b).sha256


def test_companion_files_are_part_of_completeness(tmp_path: Path) -> None:
    shards = tmp_path / "step-00000001.ds"
    (shards / "ds").mkdir(parents=True)
    (shards / "ds" / "optim.pt").write_bytes(b"x" * 100)
    path = tmp_path / "step-00000001.pt"
    manifest = save_checkpoint(path, _state(), step=1, epoch=0, companions=[shards])
    assert list(manifest.companions) == ["step-00000001.ds/ds/optim.pt"]
    (shards / "ds" / "optim.pt").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match="companion of step-00000001.pt"):
        verify_checkpoint(path)


def test_weights_only_loading_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "step-00000001.pt"
    save_checkpoint(path, {"when": datetime.date(2020, 1, 1)}, step=1, epoch=0)  # any non-tensor class
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)


def test_a_published_checkpoint_with_an_argparse_namespace_loads_safely(tmp_path: Path) -> None:
    """The ISC 2021 winners' checkpoints pickle their argparse.Namespace beside the weights: safe
    loading rebuilds it (an attribute bag) and the weights are found; code is still refused."""
    import argparse

    import torch

    from hpc_jobs.engine.weights import extract_state_dict

    path = tmp_path / "v107.pth.tar"
    torch.save({"epoch": 9, "arch": "tf_efficientnetv2_m", "args": argparse.Namespace(lr=0.0005, gem_p=1.0),
                "state_dict": {"module.fc.weight": torch.ones(2, 3)}}, path)
    raw = load_checkpoint(path, verify=False)
    assert raw["args"].gem_p == 1.0 and raw["epoch"] == 9
    assert list(extract_state_dict(raw)) == ["module.fc.weight"]
    torch.save({"args": argparse.Namespace(when=datetime.date(2020, 1, 1))}, path)  # a class inside it
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path, verify=False)


def test_checkpoint_and_environment_do_not_import_torch() -> None:
    code = ("import sys, hpc_jobs.checkpoint, hpc_jobs.environment, hpc_jobs.engine.config; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
