"""Config sweeps as arrays (hpc_jobs/sweep.py), on the local backend and as pure planning."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from hpc_jobs.sweep import parse
from tests.pipeline_helpers import cli, launch_json, status_json


def test_grid_parsing():
    sweep = parse(["lr=1e-3,3e-4", "batch_size=4,8"])
    assert sweep.keys == ["lr", "batch_size"]
    assert sweep.points == [{"lr": 1e-3, "batch_size": 4}, {"lr": 1e-3, "batch_size": 8},
                            {"lr": 3e-4, "batch_size": 4}, {"lr": 3e-4, "batch_size": 8}]
    assert parse([]) is None


def test_a_sweep_plans_arrays_with_per_task_edges_and_bad_sweeps_are_one_line(tmp_path):
    out = launch_json(tmp_path, "demo", "--cluster", "discovery", "--account", "a1", "--dry-run", "--run-name",
                      f"sw-{uuid.uuid4().hex[:6]}", "--sweep", "lr=0.1,0.2,0.3", "--sweep", "epochs=5,10", "--sweep-parallel", "2")
    stages = {s["name"]: s for s in out["stages"]}
    assert stages["shard"]["array"] == 3 and stages["train"]["array"] == 6 and stages["evaluate"]["array"] == 6
    assert "#SBATCH --array=0-5%2" in Path(stages["evaluate"]["script"]).read_text()
    assert out["sweep"]["keys"] == ["lr", "epochs"] and len(out["sweep"]["points"]) == 6
    run = json.loads((Path(out["run_dir"]) / "run.json").read_text())
    assert run["stages"]["train_more"]["inputs"]["checkpoint"]["per_task"] is True
    assert run["stages"]["train"]["inputs"]["stats"]["per_task"] is False  # shared stage: every shard, once
    for args, message in [(("--sweep", "lr"), "is not KEY=V1,V2"), (("--sweep", "nope=1,2"), "unknown config key 'nope'"),
                          (("--sweep", "lr=1,2", "--sweep-from", "shard"), "already an array"),
                          (("--sweep", "lr=1,2", "--sweep-from", "zzz"), "no such stage"),
                          (("--sweep", "lr=1,", ), "is not KEY=V1,V2")]:
        proc = cli(tmp_path, "demo", "--cluster", "local", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_a_local_sweep_ranks_points_and_resume_reruns_only_the_failed_point(tmp_path):
    proc = cli(tmp_path, "demo", "--cluster", "local", "--run-name", "sw", "--set", "epochs=4", "--set", "more_epochs=4",
               "--sweep", "lr=0.1,0.5", "--set", "fail_once=evaluate:1", check=False)
    assert proc.returncode == 1
    doc = json.loads(cli(tmp_path, "status", "sw", "--json").stdout)
    points = {p["values"]["lr"]: p for p in doc["sweep"]["points"]}
    assert points[0.5]["state"] == "FAILED" and points[0.1]["state"] == "COMPLETED"
    evaluate_dir = Path(doc["run_dir"]) / "stages" / "evaluate" / "tasks"
    kept = (evaluate_dir / "0" / "metrics.json").stat().st_mtime_ns
    out = cli(tmp_path, "resume", "sw")
    assert "resuming evaluate[1]; reusing completed" in out.stdout, out.stdout
    doc = json.loads(cli(tmp_path, "status", "sw", "--json").stdout)
    ranked = doc["sweep"]["points"]
    assert [p["state"] for p in ranked] == ["COMPLETED", "COMPLETED"]
    assert [p["values"]["lr"] for p in ranked] == [0.5, 0.1]  # lr 0.5 learns more in 8 steps: lower error first
    assert ranked[0]["metric"] == "abs_error" and ranked[0]["value"] < ranked[1]["value"]
    assert (evaluate_dir / "0" / "metrics.json").stat().st_mtime_ns == kept
    text = cli(tmp_path, "status", "sw").stdout
    assert "sweep: 2 points over lr" in text and "best abs_error first" in text
    states = status_json(tmp_path, "sw")
    assert [t["result"]["step"] for t in states["train"]["task_list"]] == [4, 4]
