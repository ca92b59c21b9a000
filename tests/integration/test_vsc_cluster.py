"""vsc on the dev cluster: `python launch.py vsc --cluster devcluster --gpus 2` (tiny preset, the
synthetic set) runs its seven batch stages as Slurm jobs chained by afterok dependencies, each
training stage DeepSpeed ZeRO-2 over 2 ranks (gloo), each init handoff resizing the ViT's
position embedding, and they all complete. Each stage trains one epoch: what is tested here is
the chain on Slurm; that the same code learns (segment AP above the untrained chain's) is
test_vsc_local's."""

from __future__ import annotations

import uuid

import pytest

from tests.pipeline_helpers import cli, job_ids, launch_json, states_of, wait_run

from .conftest import JOBS_ROOT, wait_final

BATCH = ["train_v41", "train_v44", "train_v46", "train_v45", "extract", "match", "eval"]


@pytest.fixture(scope="module")
def home():
    path = JOBS_ROOT / f"vsc-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def test_vsc_chain_runs_as_dependent_slurm_jobs(slurm_cluster, home):
    out = launch_json(home, "vsc", "--cluster", "devcluster", "--gpus", "2", "--run-name", "chain",
                     "--set", "train.epochs=1")
    ids = job_ids(out)
    assert ids["download"] == [] and all(len(ids[s]) == 1 for s in BATCH), ids
    parents = {s["name"]: s["depends_on"] for s in out["stages"]}
    assert parents["train_v44"] == ["download", "train_v41"] and parents["match"] == ["extract"]
    states = wait_run(home, "chain", timeout=1200)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    rows = {s: wait_final(ids[s][0]) for s in BATCH}
    assert all(r["State"] == "COMPLETED" for r in rows.values()), rows
    for before, after in zip(BATCH, BATCH[1:]):  # each job started only after its parent ended
        assert rows[after]["Start"] >= rows[before]["End"], (before, after, rows[before], rows[after])
    script = (home / "runs" / "vsc" / "chain" / "stages" / "train_v46" / "job.sbatch").read_text()
    assert f"--dependency=afterok:{ids['train_v44'][0]}" in script
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gres=gpu:2" in script
    for stage, grid in (("train_v44", "4x4 -> 5x5"), ("train_v46", "5x5 -> 6x6"), ("train_v45", "6x6 -> 7x7")):
        log = cli(home, "logs", "chain", stage).stdout
        assert f"{stage}: pos_embed resized: {grid} patch grid (bilinear" in log, log[-3000:]
        assert "engine: deepspeed on 2 rank(s)" in log, log[-3000:]
    assert states["train_v45"]["result"]["handoff"] == "init train_v46"
    result = states["eval"]["result"]
    assert 0.0 <= result["segment_ap"] <= 1.0 and result["ground_truth_pairs"] == 24, result
