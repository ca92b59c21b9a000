"""Arrays as first-class stages, on the local backend (the folds example workflow): a directory
per task, per-task handoffs of each task's best checkpoint, a gather stage, per-task chains that go
on when a sibling fails, and ``resume`` rerunning only the task that failed and what needs it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from hpc_jobs.checkpoint import best_complete, save_checkpoint
from hpc_jobs.errors import StageInputError
from hpc_jobs.ledger import Run
from hpc_jobs.record import JobRecord, StageRecord, compress_indices, expand_indices
from hpc_jobs.runtime import StageRunner
from hpc_jobs.spec import BestCheckpoint, Input
from tests.pipeline_helpers import cli, launch_json, status_json


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_folds_tasks_own_dirs_per_task_handoffs_and_resume_of_one_task(tmp_path):
    proc = cli(tmp_path, "folds", "--cluster", "local", "--run-name", "k", "--set", "fail_once=fit:1", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    states = status_json(tmp_path, "k")
    assert states["fit"]["tasks"] == {"0": "COMPLETED", "1": "FAILED", "2": "COMPLETED"}
    # a failed task stops only its own chain: refine's tasks 0 and 2 ran from their own fold's best
    assert states["refine"]["tasks"] == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}
    assert {s: states[s]["state"] for s in ("gather", "publish", "summary")} == {
        "gather": "CANCELLED", "publish": "CANCELLED", "summary": "CANCELLED"}
    run_dir = tmp_path / "runs" / "folds" / "k"
    fit_dir = run_dir / "stages" / "fit" / "tasks"
    for task in (0, 2):  # each task's checkpoints, metrics of progress, marker and attempt log are its own
        names = {p.name for p in (fit_dir / str(task)).iterdir()}
        assert {"checkpoints", "state.json", "attempts.jsonl", "heartbeat.json"} <= names, names
        assert json.loads((fit_dir / str(task) / "state.json").read_text())["task"] == task
    assert not (run_dir / "stages" / "fit" / "checkpoints").exists()  # nothing shared at the stage level
    log0 = (run_dir / "stages" / "refine" / "local" / "task0.rank0.log").read_text()
    assert "stages/fit/tasks/0/checkpoints/step-" in log0 and "best val_mse (min)" in log0, log0
    by_task = {t["index"]: t for t in states["fit"]["task_list"]}
    assert by_task[0]["best"].startswith("val_mse=") and by_task[1]["error"].startswith("RuntimeError: injected")

    kept = {t: _files(fit_dir / str(t)) for t in (0, 2)}
    kept_refine = _files(run_dir / "stages" / "refine" / "tasks" / "0")
    out = cli(tmp_path, "resume", "k")
    assert "resuming fit[1], refine[1], gather, publish, summary; reusing completed fetch" in out.stdout, out.stdout
    states = status_json(tmp_path, "k")
    assert {s: v["state"] for s, v in states.items()} == {s: "COMPLETED" for s in states}, states
    assert {t: _files(fit_dir / str(t)) for t in (0, 2)} == kept  # completed tasks untouched
    assert _files(run_dir / "stages" / "refine" / "tasks" / "0") == kept_refine
    result = states["summary"]["result"]
    assert result["folds"] == 3 and result["abs_error"] < 0.5, result
    gathered = json.loads((run_dir / "stages" / "gather" / "metrics.json").read_text())
    assert gathered["steps"] == [18, 18, 18]  # every fold: 12 fit epochs from its best, then 6 more


def test_status_of_one_stage_lists_its_tasks(tmp_path):
    launch_json(tmp_path, "folds", "--cluster", "local", "--run-name", "s", "--set", "folds=2")
    text = cli(tmp_path, "status", "s", "fit").stdout
    assert "2 tasks: 2 COMPLETED" in text and "val_mse=" in text, text
    data = json.loads(cli(tmp_path, "status", "s", "refine", "--json").stdout)
    assert [t["index"] for t in data["task_list"]] == [0, 1]
    assert all(t["state"] == "COMPLETED" and t["best"].startswith("val_mse=") for t in data["task_list"])
    listing = json.loads(cli(tmp_path, "status", "--json").stdout)
    assert listing["schema"] == "hpc-jobs/runs/v1"
    assert listing["runs"][0]["run"] == "s" and listing["runs"][0]["stages"] == {"COMPLETED": 6}
    bad = cli(tmp_path, "status", "s", "nope", check=False)
    assert bad.returncode == 2 and "has no stage 'nope'" in bad.stderr


def test_best_checkpoint_picks_by_metric_and_mode(tmp_path):
    for step, value in ((1, 0.5), (2, 0.2), (3, 0.9)):
        save_checkpoint(str(tmp_path / f"step-{step:08d}.pt"), {"step": step}, step=step, epoch=step,
                        metrics={"val": value})
    save_checkpoint(str(tmp_path / "step-00000004.pt"), {"step": 4}, step=4, epoch=4, metrics={})  # a signal save
    assert best_complete(tmp_path, "val", "max")[0].name == "step-00000003.pt"
    assert best_complete(tmp_path, "val", "min")[0].name == "step-00000002.pt"
    assert best_complete(tmp_path, "nope", "max") is None
    (tmp_path / "step-00000003.pt").write_bytes(b"torn")  # no longer matches its manifest
    assert best_complete(tmp_path, "val", "max")[0].name == "step-00000001.pt"
    with pytest.raises(Exception, match="use 'max' or 'min'"):
        BestCheckpoint(metric="val", mode="largest")


def test_an_input_with_no_scored_checkpoint_fails_at_start_with_one_clear_line(tmp_path):
    (tmp_path / "stages" / "fit" / "tasks" / "1" / "checkpoints").mkdir(parents=True)
    runner = StageRunner(run_dir=str(tmp_path), stage="refine", fn=print, config=None,
                         inputs={"init": Input("fit", "best", kind="init", per_task=True)}, outputs={},
                         upstream={"fit": {"array": 3, "outputs": {"best": BestCheckpoint(metric="val_mse", mode="min")}}},
                         data_root=str(tmp_path), task_index=1, num_tasks=3)
    with pytest.raises(StageInputError, match=r"best val_mse \(min\) of checkpoints/ of stage 'fit' task 1"):
        runner.resolve_inputs()


def test_inputs_from_an_array_resolve_per_task_or_to_every_task_in_order(tmp_path):
    for task in range(3):
        out = tmp_path / "stages" / "shard" / "tasks" / str(task)
        out.mkdir(parents=True)
        (out / "stats.json").write_text(str(task))
    upstream = {"shard": {"array": 3, "outputs": {"stats": "stats.json"}}}

    def resolved(per_task: bool, task):
        return StageRunner(run_dir=str(tmp_path), stage="x", fn=print, config=None,
                           inputs={"s": Input("shard", "stats", per_task=per_task)}, outputs={}, upstream=upstream,
                           data_root=str(tmp_path), task_index=task, num_tasks=3).resolve_inputs()["s"]

    assert resolved(True, 2) == tmp_path / "stages/shard/tasks/2/stats.json"
    assert [p.read_text() for p in resolved(False, None)] == ["0", "1", "2"]


def test_stage_record_round_trip_and_task_ids():
    rec = StageRecord(name="fit", array=6, depends_on=["fetch"], extra={"future_key": 1})
    rec.record_submission([JobRecord("100", array="0-5%2", tasks=list(range(6)))], 1.0)
    rec.record_submission([JobRecord("200", array="1,4", tasks=[1, 4])], 2.0)  # a resume of two tasks
    back = StageRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.slurm_ids() == ["100_0", "200_1", "100_2", "100_3", "200_4", "100_5"]
    assert back.job_for_task(3).job_id == "100" and back.job_for_task(4).job_id == "200"
    assert back.history[-1]["tasks"] == [1, 4] and back.extra == {"future_key": 1}
    assert compress_indices([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and expand_indices("0-2,5%3") == [0, 1, 2, 5]


def test_explicit_gpus_bound_every_gpu_stage(tmp_path):
    out = launch_json(tmp_path, "isc", "--preset", "paper", "--gpus", "2", "--cluster", "discovery",
                      "--account", "acct", "--dry-run", "--run-name", f"g-{uuid.uuid4().hex[:8]}")
    run = Run(Path(out["run_dir"]))
    gpus = {r.name: r.resources["gpus_per_node"] for r in run.in_order()}
    assert max(gpus.values()) == 2 and gpus["postprocess"] <= 2, gpus


def _fit_intervals(home: Path, run: str) -> list:
    """(start, end) of each fit task's attempt, from its attempt log, in task order."""
    fit = home / "runs" / "folds" / run / "stages" / "fit" / "tasks"
    spans = []
    for task in range(3):
        events = [json.loads(line) for line in (fit / str(task) / "attempts.jsonl").read_text().splitlines()]
        spans.append((next(e["time"] for e in events if e["event"] == "start"),
                      next(e["time"] for e in events if e["event"] == "end")))
    return spans


@pytest.mark.parametrize("parallel", ["1", "3"])
def test_local_array_tasks_run_side_by_side_as_set(tmp_path, monkeypatch, parallel):
    monkeypatch.setenv("HPC_JOBS_LOCAL_PARALLEL", parallel)
    proc = cli(tmp_path, "folds", "--cluster", "local", "--run-name", "p", "--set", "epochs=4",
               "--set", "refine_epochs=1", "--set", "sleep_s=0.3")
    assert "[fit:2]" in proc.stdout
    spans = _fit_intervals(tmp_path, "p")
    overlapping = max(start for start, _ in spans) < min(end for _, end in spans)
    assert overlapping == (parallel == "3"), spans  # all three at once, or one after another
    if parallel == "1":
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(2)), spans
    assert {s["state"] for s in status_json(tmp_path, "p").values()} == {"COMPLETED"}


def test_a_bad_local_parallel_setting_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_JOBS_LOCAL_PARALLEL", "two")
    proc = cli(tmp_path, "folds", "--cluster", "local", "--run-name", "bad", check=False)
    assert proc.returncode != 0
    assert "HPC_JOBS_LOCAL_PARALLEL must be a whole number of tasks, 1 or more (got 'two')" in proc.stderr
    assert "[fetch]" not in proc.stdout, proc.stdout


def test_task_slots_follow_the_cpus_the_setting_and_the_stage_throttle(monkeypatch):
    from hpc_jobs.backends import local

    monkeypatch.delenv("HPC_JOBS_LOCAL_PARALLEL", raising=False)
    monkeypatch.setattr(local, "cpu_count", lambda: 16)
    monkeypatch.setattr(local, "has_cuda", lambda: False)
    assert local.task_slots(10, 1, False) == local.MAX_SLOTS  # memory: a whole process per task
    assert local.task_slots(10, 8, False) == 2  # one CPU per rank
    assert local.task_slots(10, 1, False, throttle=3) == 3 and local.task_slots(2, 1, False) == 2
    assert local.task_slots(10, 1, True) == 4  # no CUDA: a GPU stage's ranks run on the CPU
    monkeypatch.setattr(local, "has_cuda", lambda: True)
    assert local.task_slots(10, 1, True) == 1 and local.task_slots(10, 1, False) == 4
    monkeypatch.setenv("HPC_JOBS_LOCAL_PARALLEL", "6")
    assert local.task_slots(10, 1, True) == 6 and local.task_slots(10, 1, True, throttle=2) == 2
