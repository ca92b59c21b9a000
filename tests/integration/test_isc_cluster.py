"""isc on the dev cluster: `python launch.py isc --cluster devcluster --gpus 2` (tiny preset, the
synthetic set) runs its eight batch stages as Slurm jobs chained by afterok dependencies, each
training stage DDP over 2 ranks, and they all complete. Each stage trains one epoch (v83_cont two,
so it resumes at epoch 1): what is tested here is the chain on Slurm; that the same code learns
(uAP well above the untrained chain's) is test_isc_local's."""

from __future__ import annotations

import uuid

import pytest

from tests.pipeline_helpers import cli, job_ids, launch_json, states_of, wait_run

from .conftest import JOBS_ROOT, wait_final

BATCH = ["train_v83", "train_v83_cont", "train_v86", "train_v98", "train_v107", "extract", "postprocess", "eval"]


@pytest.fixture(scope="module")
def home():
    path = JOBS_ROOT / f"isc-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def test_isc_chain_runs_as_dependent_slurm_jobs(slurm_cluster, home):
    out = launch_json(home, "isc", "--cluster", "devcluster", "--gpus", "2", "--run-name", "chain",
                     "--set", "train.epochs=1")
    ids = job_ids(out)
    assert ids["download"] == [] and all(len(ids[s]) == 1 for s in BATCH), ids
    parents = {s["name"]: s["depends_on"] for s in out["stages"]}
    assert parents["train_v83_cont"] == ["download", "train_v83"] and parents["eval"] == ["download", "postprocess"]
    states = wait_run(home, "chain", timeout=900)
    assert states_of(states) == {s: "COMPLETED" for s in states}, states
    rows = {s: wait_final(ids[s][0]) for s in BATCH}
    assert all(r["State"] == "COMPLETED" for r in rows.values()), rows
    for before, after in zip(BATCH, BATCH[1:]):  # each job started only after its parent ended
        assert rows[after]["Start"] >= rows[before]["End"], (before, after, rows[before], rows[after])
    script = (home / "runs" / "isc" / "chain" / "stages" / "train_v86" / "job.sbatch").read_text()
    assert f"--dependency=afterok:{ids['train_v83_cont'][0]}" in script
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gres=gpu:2" in script
    cont = cli(home, "logs", "chain", "train_v83_cont").stdout
    assert "train_v83_cont: resumed train_v83 at epoch 1" in cont, cont[-3000:]
    assert "ddp on 2 rank(s)" in cont
    assert "ddp on 2 rank(s)" in cli(home, "logs", "chain", "train_v107").stdout
    result = states["eval"]["result"]
    assert isinstance(result["uap"], float) and 0.0 < result["uap"] <= 1.0, result
    assert states["train_v86"]["result"]["handoff"] == "init train_v83_cont"
