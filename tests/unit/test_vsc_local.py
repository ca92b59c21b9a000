"""`python launch.py vsc --cluster local --gpus 2`: the whole chain on the synthetic set, on this
machine, every training stage DeepSpeed ZeRO-2 over 2 ranks (gloo); the same pipeline with
training skipped (`--set train.epochs=0`) is the baseline whose segment AP the trained one must
beat; it runs beside the trained chain, in its own home."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, status_json, trained_and_untrained, workflow_lines

STAGES = ("download", "train_v41", "train_v44", "train_v46", "train_v45", "extract", "match", "eval")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_and_untrained(tmp_path_factory, "vsc", gpus=2, timeout=900, untrained_gpus=1)


def _run_dir(home: Path, run: str) -> Path:
    return Path(json.loads(cli(home, "status", run, "--json").stdout)["run_dir"])


def test_every_stage_completes_with_zero2_and_resized_position_embeddings(runs):
    home, _, trained, _ = runs
    assert workflow_lines(trained.stdout)[0].startswith("[download] vsc: no VSC data configured: using the SYNTHETIC set")
    states = status_json(home, "trained")
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in STAGES}
    run_dir = _run_dir(home, "trained")
    grids = {"train_v44": "4x4 -> 5x5", "train_v46": "5x5 -> 6x6", "train_v45": "6x6 -> 7x7"}
    for stage in ("train_v41", *grids):
        log = (run_dir / "stages" / stage / "local" / "rank0.log").read_text()
        assert "engine: deepspeed on 2 rank(s), device cpu, precision fp32" in log, log[:2000]
        if stage in grids:
            assert f"{stage}: pos_embed resized: {grids[stage]} patch grid (bilinear" in log, log[:2000]
            assert states[stage]["result"]["handoff"] == f"init {dict(train_v44='train_v41', train_v46='train_v44', train_v45='train_v46')[stage]}"
    assert "pos_embed resized" not in (run_dir / "stages" / "train_v41" / "local" / "rank0.log").read_text()


def test_training_raises_segment_ap_over_the_untrained_chain(runs):
    home, base_home, _, untrained = runs
    base = status_json(base_home, "untrained")
    assert {k: v["state"] for k, v in base.items()} == {s: "COMPLETED" for s in STAGES}
    assert "train_v41: no training (epochs=0): handing on its starting weights" in untrained.stdout
    got, ref = status_json(home, "trained")["eval"]["result"], base["eval"]["result"]
    print(f"segment AP trained {got['segment_ap']:.4f} vs epochs=0 {ref['segment_ap']:.4f}; "
          f"pair micro AP {got['pair_micro_ap']:.4f} vs {ref['pair_micro_ap']:.4f}")
    # Segment AP (the track's metric) rises on every CPU measured: 0.44 (the machine of issue 13),
    # 0.43 (AVX2 kernels forced), 0.38 (AVX-512/AMX kernels) against 0.32 untrained. The trained
    # chain's pair micro AP is not stable across CPUs' float rounding (0.49, 0.40, 0.33 against
    # 0.42 untrained): a network from scratch in 256 steps; it is printed, not asserted.
    assert got["segment_ap"] > ref["segment_ap"] + 0.03, (got, ref)
    assert got["pairs_found"] >= ref["pairs_found"], (got, ref)


def test_outputs_have_the_challenge_formats(runs):
    import h5py

    home, _, trained, _ = runs
    run_dir = _run_dir(home, "trained")
    with h5py.File(run_dir / "stages" / "extract" / "descriptors.h5") as f:
        assert f["query"].shape[1] == 128 and len(f["query_ids"]) == 36 and len(f["noise_ids"]) == 20
        assert f["query_offsets"][-1] == f["query"].shape[0] == 36 * 16
    with open(run_dir / "stages" / "match" / "matches.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["query_id", "ref_id", "query_start", "query_end", "ref_start", "ref_end", "score"]
    assert len(rows) > 1 and all(float(r[3]) > float(r[2]) and float(r[5]) > float(r[4]) for r in rows[1:])
    metrics = json.loads((run_dir / "stages" / "eval" / "metrics.json").read_text())
    assert metrics["ground_truth_pairs"] == 24 and "vsc eval: segment AP" in trained.stdout
