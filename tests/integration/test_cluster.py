"""The dev cluster does what the rest of hpc-jobs relies on, driven by plain submitit 1.5.4.

Needs the cluster up (``sudo python -m hpc_jobs.devcluster up``): the ``slurm_cluster`` fixture
fails every test otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cloudpickle
import pytest
import submitit

# Jobs unpickle these functions in another process that cannot import this test module: send
# them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm


def make_executor(folder: Path, name: str, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout_min > 10 so that submitit treats a USR2 as preemption, not as a time-out.
    executor.update_parameters(name=name, timeout_min=30, **params)
    return executor


def sacct_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# ------------------------------------------------------------------------- functions run in jobs
def add(a, b):
    return a + b


def stamp(seconds: float, fail: bool = False):
    start = time.time()
    time.sleep(seconds)
    if fail:
        raise RuntimeError("parent fails on purpose")
    return start, time.time()


def visible_gpus():
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE",
                                           "SLURM_JOB_GPUS")}


def all_reduce_rank():
    import torch
    import torch.distributed as dist

    env = submitit.JobEnvironment()
    master = env.hostnames[0]
    port = 20000 + int(env.job_id) % 20000
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}",
                            rank=env.global_rank, world_size=env.num_tasks)
    try:
        value = torch.tensor([float(env.global_rank + 1)])
        dist.all_reduce(value)
        return {"rank": env.global_rank, "world": dist.get_world_size(), "sum": value.item(),
                "node": os.environ["SLURMD_NODENAME"], "master": master}
    finally:
        dist.destroy_process_group()


class Counter(submitit.helpers.Checkpointable):
    """Counts to ``total``, saving its progress to ``state_file`` after every step, and appends
    (first step, restart count) to ``runs_file`` at each start."""

    def __init__(self, state_file: str, runs_file: str):
        self.state_file, self.runs_file = state_file, runs_file

    def __call__(self, total: int, step_s: float):
        path = Path(self.state_file)
        start = int(path.read_text()) if path.exists() else 0
        with open(self.runs_file, "a") as f:
            f.write(f"{start} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        for i in range(start, total):
            time.sleep(step_s)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(i + 1))
            tmp.replace(path)
        return {"resumed_from": start, "count": int(path.read_text())}


def hold_until_preempted(runs_dir: str):
    """First run: block (until preempted). Any later run of the requeued job: return at once."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    rank = submitit.JobEnvironment().global_rank
    with open(Path(runs_dir) / f"rank{rank}", "a") as f:
        f.write(f"{restarts}\n")
    if restarts == 0:
        time.sleep(600)
    return restarts


# ------------------------------------------------------------------------------------- tests
def test_function_job_returns_its_result(slurm_cluster, job_dir, job_name):
    job = make_executor(job_dir, job_name).submit(add, 40, 2)
    record = slurm_cluster.wait_final(job.job_id)
    assert record["State"] == "COMPLETED"
    assert record["Partition"] == "batch"
    assert job.result() == 42


def test_afterok_chain_runs_in_order(slurm_cluster, job_dir, job_name):
    executor = make_executor(job_dir, job_name)
    jobs = [executor.submit(stamp, 0.5)]
    for _ in range(2):
        executor.update_parameters(
            slurm_additional_parameters={"dependency": f"afterok:{jobs[-1].job_id}"})
        jobs.append(executor.submit(stamp, 0.5))
    records = [slurm_cluster.wait_final(j.job_id) for j in jobs]
    assert [r["State"] for r in records] == ["COMPLETED"] * 3
    for before, after in zip(records, records[1:]):  # sacct has 1 s resolution...
        assert sacct_time(after["Start"]) >= sacct_time(before["End"]), (before, after)
    results = [j.result() for j in jobs]
    for (_, end), (start, _) in zip(results, results[1:]):  # ...the jobs' own clocks finer
        assert start >= end


def test_failed_parent_cancels_its_child(slurm_cluster, job_dir, job_name):
    executor = make_executor(job_dir, job_name)
    parent = executor.submit(stamp, 0.5, True)
    executor.update_parameters(
        slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}"})
    child = executor.submit(add, 1, 1)
    assert slurm_cluster.wait_final(parent.job_id)["State"] == "FAILED"
    # kill_invalid_depend: the child is cancelled instead of pending forever.
    assert slurm_cluster.wait_final(child.job_id, timeout=60)["State"] == "CANCELLED"
    with pytest.raises(Exception, match="parent fails on purpose"):
        parent.result()


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_two_node_gloo_all_reduce(slurm_cluster, job_dir, job_name, tasks_per_node):
    executor = make_executor(job_dir, job_name, nodes=2, tasks_per_node=tasks_per_node,
                             cpus_per_task=1)
    job = executor.submit(all_reduce_rank)
    record = slurm_cluster.wait_final(job.job_id)
    assert record["State"] == "COMPLETED"
    assert record["NodeList"] == "n[1-2]"
    results = sorted(job.results(), key=lambda r: r["rank"])
    world = 2 * tasks_per_node
    assert [r["rank"] for r in results] == list(range(world))
    assert {r["world"] for r in results} == {world}
    assert {r["sum"] for r in results} == {world * (world + 1) / 2}
    assert {r["node"] for r in results} == {"n1", "n2"}
    assert results[0]["master"] == "n1"


def test_gpus_per_node_sees_two_devices(slurm_cluster, job_dir, job_name):
    job = make_executor(job_dir, job_name, gpus_per_node=2).submit(visible_gpus)
    assert slurm_cluster.wait_final(job.job_id)["State"] == "COMPLETED"
    env = job.result()
    assert env["CUDA_VISIBLE_DEVICES"] is not None, env
    assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == 2, env
    assert env["SLURM_GPUS_ON_NODE"] == "2", env


def test_checkpointable_job_resumes_after_usr2(slurm_cluster, job_dir, job_name):
    state_file, runs_file = job_dir / "count", job_dir / "runs"
    job = make_executor(job_dir, job_name).submit(Counter(str(state_file), str(runs_file)), 30, 0.2)
    # Let it make progress, then signal it the way preemption or a time limit would.
    slurm_cluster.wait_for(lambda: state_file.exists() and int(state_file.read_text() or 0) >= 3,
                           90, "the job to count to 3")
    res = subprocess.run(["scancel", "--signal=USR2", job.job_id], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert slurm_cluster.wait_final(job.job_id)["State"] == "COMPLETED"
    result = job.result()
    runs = [line.split() for line in runs_file.read_text().splitlines()]
    assert len(runs) == 2, runs
    assert runs[0] == ["0", "0"]
    assert int(runs[1][0]) >= 3 and runs[1][1] == "1", runs  # resumed from its saved state
    assert result == {"resumed_from": int(runs[1][0]), "count": 30}
    earlier = slurm_cluster.sacct(job.job_id, duplicates=True)[:-1]
    assert [r["State"] for r in earlier] == ["REQUEUED"], earlier


def test_high_partition_preempts_batch_job(slurm_cluster, job_dir, job_name):
    runs_dir = job_dir / "runs"
    runs_dir.mkdir()
    # Take every CPU of both nodes in the preemptible default partition.
    low = make_executor(job_dir, job_name, nodes=2, tasks_per_node=1, cpus_per_task=4).submit(
        hold_until_preempted, str(runs_dir))
    slurm_cluster.wait_for(lambda: len(list(runs_dir.iterdir())) == 2, 90,
                           "the batch job to run on both nodes")

    high = make_executor(job_dir, job_name, slurm_partition="high").submit(add, 2, 3)
    high_record = slurm_cluster.wait_final(high.job_id)
    assert high_record["State"] == "COMPLETED"
    assert high.result() == 5

    low_record = slurm_cluster.wait_final(low.job_id)
    assert low_record["State"] == "COMPLETED"
    assert low.results() == [1, 1]  # what the requeued run returned
    for rank in (0, 1):
        assert (runs_dir / f"rank{rank}").read_text().split() == ["0", "1"]
    earlier = slurm_cluster.sacct(low.job_id, duplicates=True)[:-1]
    assert earlier and earlier[0]["State"] in ("PREEMPTED", "REQUEUED"), earlier
    assert sacct_time(low_record["Start"]) >= sacct_time(high_record["Start"])


def test_up_with_cancel_jobs_leaves_the_nodes_empty(slurm_cluster, job_dir, job_name):
    # What slurmctld recovers from a killed test run looks like this: a job holding a node.
    from hpc_jobs.devcluster.cluster import DevCluster

    job = make_executor(job_dir, job_name).submit(stamp, 600)
    slurm_cluster.wait_for(lambda: slurm_cluster.job_state(job.job_id) == "RUNNING", 60,
                           "the leftover job to run")
    result = DevCluster().up(cancel_jobs=True)
    assert any(a.startswith("cancelled ") for a in result.actions), result.actions
    assert slurm_cluster.wait_final(job.job_id)["State"] == "CANCELLED"
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    assert dict(line.split() for line in nodes.stdout.splitlines()) == {"n1": "idle", "n2": "idle"}
