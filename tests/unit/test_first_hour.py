"""What a new user types in the first hour: the sbatch options, --show-config, --help with types
and defaults, and commands that must not crash on a damaged record or odd arguments."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.pipeline_helpers import cli, launch_json


def _script(out: dict, stage: str) -> str:
    return Path(next(s for s in out["stages"] if s["name"] == stage)["script"]).read_text()


def test_sbatch_options_reach_the_gpu_stages_and_stage_set_one_stage(tmp_path):
    out = launch_json(tmp_path, "diving", "--cluster", "discovery", "--account", "a1", "--dry-run",
                      "--run-name", f"o-{uuid.uuid4().hex[:6]}", "--mem", "64G", "--cpus-per-task", "4",
                      "--qos", "normal", "--constraint", "a100", "--exclude", "d05-[10-12]", "--mail-type", "end,fail",
                      "--mail-user", "me@usc.edu", "--sbatch", "reservation=r1", "--sbatch", "nice",
                      "--stage-set", "prepare.time=03:00:00", "--stage-set", "prepare.mem=6G")
    train = _script(out, "train")
    for line in ("--mem=65536M", "--cpus-per-task=4", "--qos=normal", "--constraint=a100", "--exclude=d05-[10-12]",
                 "--mail-type=END,FAIL", "--mail-user=me@usc.edu", "--reservation=r1", "#SBATCH --nice\n"):
        assert line in train, line
    prepare = _script(out, "prepare")  # a CPU stage: only its own --stage-set values
    assert "--time=03:00:00" in prepare and "--mem=6144M" in prepare and "--qos" not in prepare


def test_bad_sbatch_options_are_one_line_before_anything_exists(tmp_path):
    for args, message in [
        (("--mail-type", "SOMETIMES"), "is not Slurm's"),
        (("--sbatch", "time=1"), "is set by hpc-jobs; use --time"),
        (("--sbatch", "bad key=1"), "not an sbatch long option name"),
        (("--sbatch", "reservation=a;b"), "contains characters Slurm does not accept"),
        (("--stage-set", "nope.mem=1G"), "no stage 'nope'"),
        (("--stage-set", "train.color=red"), "'color' is not a resource"),
        (("--stage-set", "train.nodes=two"), "not a whole number"),
        (("--exclude", "a;b"), "contains characters"),
        (("--run-name", "last"), "is reserved"),
    ]:
        proc = cli(tmp_path, "demo", "--cluster", "devcluster", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


def test_show_config_says_where_each_value_comes_from(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("epochs: 4\n")
    data = json.loads(cli(tmp_path, "diving", "--preset", "tiny", "--config", str(conf), "--set", "seed=7",
                          "--show-config", "--json").stdout)["config"]
    assert data["seed"] == {"value": 7, "type": "int", "source": "--set"}
    assert data["epochs"]["source"] == f"--config {conf}" and data["epochs"]["value"] == 4
    assert data["topology"]["source"] == "preset tiny" and data["momentum"]["source"] == "default"
    text = cli(tmp_path, "demo", "--show-config").stdout
    assert "epochs" in text and "default" in text
    assert not (tmp_path / "runs").exists()  # nothing ran
    helptext = cli(tmp_path, "demo", "--help").stdout
    assert "epochs: int = 20" in helptext and "--mail-type" in helptext


def test_a_damaged_record_is_reported_and_every_other_run_still_shows(tmp_path):
    launch_json(tmp_path, "demo", "--cluster", "local", "--run-name", "good", "--set", "epochs=2", "--set", "more_epochs=2")
    bad = tmp_path / "runs" / "demo" / "bad"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text('{"run": "bad", "stages": {"a": ')  # cut mid-write
    with open(tmp_path / "recent-runs.txt", "a") as fh:
        fh.write(f"{bad}\n")
    listing = cli(tmp_path, "status")
    assert "good" in listing.stdout and "DAMAGED" in listing.stdout and "Traceback" not in listing.stderr
    runs = {r["run"]: r for r in json.loads(cli(tmp_path, "status", "--json").stdout)["runs"]}
    assert runs["bad"]["damaged"] and runs["good"]["stages"] == {"COMPLETED": 5}
    last = cli(tmp_path, "status", "last", check=False)
    assert last.returncode == 2 and "damaged" in last.stderr and last.stderr.count("\n") == 1
    assert cli(tmp_path, "status", "good").returncode == 0


def test_logs_line_counts(tmp_path):
    launch_json(tmp_path, "demo", "--cluster", "local", "--run-name", "l", "--set", "epochs=2", "--set", "more_epochs=2")
    everything = cli(tmp_path, "logs", "l", "train").stdout.splitlines()
    # what the runtime says of every attempt is in the log, even of a stage that prints nothing
    assert everything[0].startswith("[hpc_jobs] attempt 1 of stage train on ") and len(everything) >= 2
    assert "[hpc_jobs] stage train COMPLETED in" in everything[-1] and '"step": 2' in everything[-1]
    assert cli(tmp_path, "logs", "l", "train", "-n", "0").stdout.strip() == ""
    assert cli(tmp_path, "logs", "l", "train", "-n", "1").stdout.splitlines() == everything[-1:]
    neg = cli(tmp_path, "logs", "l", "train", "-n", "-3", check=False)
    assert neg.returncode == 2 and "0 or more" in neg.stderr


def test_every_json_output_has_one_schema(tmp_path):
    """launch --json, status RUN --json, resume --json: the same document, the same keys."""
    launched = launch_json(tmp_path, "demo", "--cluster", "local", "--run-name", "j", "--set", "fail_once=evaluate",
                           "--set", "epochs=2", "--set", "more_epochs=2", check=False)
    status = json.loads(cli(tmp_path, "status", "j", "--json").stdout)
    resumed = json.loads(cli(tmp_path, "resume", "j", "--json").stdout)
    for doc in (launched, status, resumed):
        assert doc["schema"] == "hpc-jobs/run/v1"
        assert {"run", "run_dir", "workflow", "backend", "cluster", "finished", "ok", "failed", "stages"} <= set(doc)
        for stage in doc["stages"]:
            assert {"name", "state", "job_ids", "depends_on", "where", "result", "task_list", "elapsed"} <= set(stage)
    assert launched["failed"] == ["evaluate"] and not launched["ok"] and launched["finished"]
    assert status["failed"] == ["evaluate"]
    assert resumed["ok"] and resumed["failed"] == [] and resumed["stages"][-1]["result"]["steps"] == 4


def test_a_local_launch_shows_each_stage_as_it_goes_not_at_the_end(tmp_path):
    """The first stage's lines reach the terminal while later stages still run, and what a stage
    printed is in its log (`logs RUN STAGE`)."""
    import os
    import subprocess
    import sys
    import time

    from tests.pipeline_helpers import REPO

    env = dict(os.environ, HPC_JOBS_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "launch.py", "demo", "--cluster", "local", "--run-name", "live"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrived = {}
    for line in proc.stdout:
        for stage in ("train", "evaluate"):
            if line.startswith(f"[{stage}] [hpc_jobs] stage {stage} COMPLETED"):
                arrived[stage] = time.monotonic()
    assert proc.wait(timeout=120) == 0
    # train_more and evaluate (a process each) ran in between: seconds, not a burst at the end
    assert arrived["evaluate"] - arrived["train"] > 1.0, arrived
    log = cli(tmp_path, "logs", "live", "train").stdout
    assert "[hpc_jobs] stage train COMPLETED" in log, log
