"""The Slurm backend without a cluster: an array submits no file per task; each task makes its own
submitit pickle in the job (``python -m hpc_jobs.backends.slurm FOLDER``)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from submitit.core.utils import DelayedSubmission  # noqa: E402

from hpc_jobs import Pipeline, Resources, Stage, Workflow, register  # noqa: E402
from hpc_jobs import render as rendermod  # noqa: E402
from hpc_jobs.backends import slurm as backend  # noqa: E402
from hpc_jobs.runtime import StageRunner, write_runner  # noqa: E402


def _stage(tmp_path: Path) -> Path:
    stage_dir = tmp_path / "run" / "stages" / "shard"
    stage_dir.mkdir(parents=True)
    write_runner(stage_dir, StageRunner(run_dir=str(tmp_path / "run"), stage="shard", fn=len, config=None, inputs={},
                                        outputs={}, upstream={}, data_root="/data", num_tasks=10))
    return rendermod.submitit_folder(stage_dir)


def _env(**kw):
    return {"SLURM_ARRAY_JOB_ID": "77", "SLURM_PROCID": "0", "HPC_JOBS_TIMEOUT_MIN": "30", **kw}


def test_an_array_task_writes_its_own_pickle_for_offset_plus_index(tmp_path):
    folder = _stage(tmp_path)
    path = backend.task_pickle(str(folder), _env(SLURM_ARRAY_TASK_ID="3", HPC_JOBS_ARRAY_OFFSET="5"))
    assert path == folder / "77_3_submitted.pkl"
    delayed = DelayedSubmission.load(path)
    assert isinstance(delayed.function, StageRunner)
    assert delayed.function.task_index == 8 and delayed.function.stage == "shard"
    assert delayed._timeout_min == 30 and delayed._timeout_countdown == backend.MAX_NUM_TIMEOUT
    assert [p.name for p in folder.iterdir()] == ["77_3_submitted.pkl"]  # no temporary file left


def test_an_existing_pickle_is_kept(tmp_path):
    """A requeued task keeps its first start's pickle or the one submitit checkpointed."""
    folder = _stage(tmp_path)
    folder.mkdir()
    kept = folder / "77_3_submitted.pkl"
    kept.write_bytes(pickle.dumps("checkpointed"))
    assert backend.task_pickle(str(folder), _env(SLURM_ARRAY_TASK_ID="3")) == kept
    assert pickle.loads(kept.read_bytes()) == "checkpointed"


def test_only_rank_0_writes_and_a_plain_job_writes_nothing(tmp_path):
    folder = _stage(tmp_path)
    assert backend.task_pickle(str(folder), _env(SLURM_ARRAY_TASK_ID="0", SLURM_PROCID="1")) == folder / "77_0_submitted.pkl"
    assert not (folder / "77_0_submitted.pkl").exists()  # rank 1 waits for it in submitit's entry
    assert backend.task_pickle(str(folder), {"SLURM_JOB_ID": "78", "SLURM_PROCID": "0"}) is None
    assert not folder.exists()


def test_only_array_scripts_run_the_array_entry(tmp_path):
    from hpc_jobs.profiles import load

    profile = load("discovery")
    kw = dict(workflow="demo", run_id="r", run_dir=tmp_path / "run", launch_python="python", account="a")
    array = rendermod.build_job(Stage("shard", len, resources=Resources(time="01:30:00"), array=40), profile,
                                array="20-39", array_offset=20, **kw)
    plain = rendermod.build_job(Stage("train", len, resources=Resources()), profile, **kw)
    assert backend.lazy_array(rendermod.render(array)) and not backend.lazy_array(rendermod.render(plain))
    assert ("HPC_JOBS_ARRAY_OFFSET", "20") in array.env and ("HPC_JOBS_TIMEOUT_MIN", "90") in array.env
    assert "-m submitit.core._submit " in plain.command
    assert not any(k.startswith("HPC_JOBS_ARRAY") for k, _ in plain.env)


def _noop(ctx):
    return None


@dataclass
class BigArrayConfig:
    tasks: int = 1000


@register
class BigArray(Workflow):
    name = "test_big_array"
    summary = "test: one stage, an array of 1,000 no-op tasks"
    Config = BigArrayConfig

    def build(self):
        return Pipeline(self.name, [Stage("tasks", _noop, resources=Resources(time="00:05:00"), array=self.config.tasks)])


class _FakeExecutorRuns:
    """Record what the backend hands to sbatch, without Slurm."""

    def __init__(self, monkeypatch):
        self.scripts = []
        self.pickled = []
        runs = self

        def submit_command(executor, command):
            runs.scripts.append(executor._script)

            class J:
                job_id = str(100 + len(runs.scripts))
            return J()

        def submit_array(executor, fns, indices=None):
            runs.pickled.append(len(fns))
            runs.scripts.append(executor._script)

            class J:
                job_id = f"{100 + len(runs.scripts)}_0"
            return [J()]

        monkeypatch.setattr(backend.RenderedScriptExecutor, "_submit_command", submit_command)
        monkeypatch.setattr(backend.RenderedScriptExecutor, "submit_array", submit_array)


def test_launching_an_array_writes_no_pickle_per_task_and_each_chunk_knows_its_offset(tmp_path, monkeypatch):
    """A 1,000-task array split in chunks (MaxArraySize 400): one sbatch per chunk, no per-task
    file; each chunk's script says its first task."""
    from hpc_jobs import launch as launchmod
    from hpc_jobs.launch import LaunchRequest
    from hpc_jobs.workflow import LaunchOptions

    monkeypatch.setenv("HPC_JOBS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(launchmod, "_max_array", lambda profile: 400)
    monkeypatch.setattr(launchmod, "preflight", lambda plan, jobs, test_only: None)
    monkeypatch.setattr(launchmod, "_slurm_version", lambda profile: None)
    runs = _FakeExecutorRuns(monkeypatch)
    req = LaunchRequest(workflow="test_big_array", cluster="generic", options=LaunchOptions(partition="batch"))
    plan = launchmod.make_plan(req)
    jobs = launchmod.preview_jobs(plan)
    run = launchmod.record_run(plan, req, jobs)
    run.record["max_array_size"] = 400
    backend.SlurmBackend().start(run, launchmod.whole(run, run.order), echo=lambda s: None)
    assert runs.pickled == []  # no per-task pickles at submission
    assert [s.count("HPC_JOBS_ARRAY_OFFSET=") for s in runs.scripts] == [1, 1, 1]
    offsets = [next(l for l in s.splitlines() if "HPC_JOBS_ARRAY_OFFSET=" in l) for s in runs.scripts]
    chunks = run.stage("tasks").jobs
    assert len(chunks) == 3 and chunks[0].offset == 0 and chunks[1].offset > 0
    assert offsets == [f"export HPC_JOBS_ARRAY_OFFSET={j.offset}" for j in chunks]
    assert not list((run.stage_dir("tasks") / "slurm").glob("*_submitted.pkl"))


def test_a_requeued_stage_ends_its_process_once_its_records_are_on_disk(tmp_path):
    """In a Slurm job, Slurm starts the requeued job again only once the old processes are gone: the
    runner ends the process right after the marker and the attempt log (exit 75, no interpreter
    teardown: an atexit handler never runs). Outside a job the exception reaches the caller."""
    import json
    import os
    import subprocess
    import sys

    script = f"""
import atexit, sys
from pathlib import Path
from hpc_jobs.interrupts import Requeued
from hpc_jobs.runtime import StageRunner

def train(ctx):
    raise Requeued("requeued at step 7", step=7, epoch=0, checkpoint=None, signal=12, requeued=True)

atexit.register(lambda: Path({str(tmp_path / 'teardown')!r}).write_text("ran"))
try:
    StageRunner(run_dir={str(tmp_path / 'run')!r}, stage="train", fn=train, config=None, inputs={{}}, outputs={{}},
                upstream={{}}, data_root="/data")()
except Requeued:
    sys.exit(3)
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    in_job = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**base, "SLURM_JOB_ID": "41", "SUBMITIT_EXECUTOR": "slurm"})
    assert in_job.returncode == 75, in_job.stderr
    assert not (tmp_path / "teardown").exists()  # ended before interpreter teardown
    stage_dir = tmp_path / "run" / "stages" / "train"
    assert json.loads((stage_dir / "state.json").read_text())["state"] == "REQUEUED"
    ends = [json.loads(l) for l in (stage_dir / "attempts.jsonl").read_text().splitlines()]
    assert [e["event"] for e in ends] == ["start", "end"] and ends[-1]["step"] == 7

    outside = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=base)
    assert outside.returncode == 3, outside.stderr  # the caller saw the exception
    assert (tmp_path / "teardown").read_text() == "ran"
