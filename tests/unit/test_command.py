"""`python launch.py run -- CMD`: a user's own script as a one-stage pipeline, on the local backend."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import yaml

from tests.pipeline_helpers import REPO, cli, status_json


def test_a_wrapped_script_runs_with_its_checkpoint_dir_and_is_in_the_ledger(tmp_path):
    proc = cli(tmp_path, "run", "--cluster", "local", "--run-name", "s", "--", "python",
               "docs/scripts/train_script.py", "--steps", "12", "--lr", "0.002")
    assert "starting at step 0 (restart 0, lr 0.002)" in proc.stdout, proc.stdout
    states = status_json(tmp_path, "s")
    assert states["cmd"]["state"] == "COMPLETED" and states["cmd"]["result"]["exit_code"] == 0
    run_dir = tmp_path / "runs" / "run" / "s"
    assert json.loads((run_dir / "stages/cmd/checkpoints/state.json").read_text())["step"] == 12
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["command"] == ["python", "docs/scripts/train_script.py", "--steps", "12", "--lr", "0.002"]
    assert config["workdir"] == str(REPO)
    log = cli(tmp_path, "logs", "s", "cmd").stdout
    assert "done: step 12" in log and "[hpc_jobs] attempt 1 of stage cmd" in log
    # a rerun of the same stage (resume after a failure) starts from the script's own checkpoint
    again = cli(tmp_path, "run", "--cluster", "local", "--run-name", "t", "--", "python", "-c",
                "import os,sys; sys.exit(0 if os.environ['HPC_JOBS_CHECKPOINT_DIR'].endswith('stages/cmd/checkpoints') else 3)")
    assert again.returncode == 0


def test_a_failing_command_fails_the_stage_and_resume_runs_it_again(tmp_path):
    flag = tmp_path / "flag"
    script = f"import pathlib,sys; p=pathlib.Path({str(flag)!r}); ok=p.exists(); p.touch(); sys.exit(0 if ok else 4)"
    proc = cli(tmp_path, "run", "--cluster", "local", "--run-name", "f", "--", "python", "-c", script, check=False)
    assert proc.returncode == 1
    states = status_json(tmp_path, "f")
    assert states["cmd"]["state"] == "FAILED" and "exited with code 4" in states["cmd"]["error"]
    cli(tmp_path, "resume", "f")
    assert status_json(tmp_path, "f")["cmd"]["state"] == "COMPLETED"


def test_run_needs_a_command_after_the_double_dash(tmp_path):
    for args in (("run", "--gpus", "1"), ("run", "--cluster", "local", "--")):
        proc = cli(tmp_path, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: run:") and proc.stderr.count("\n") == 1, proc.stderr
    dry = cli(tmp_path, "run", "--cluster", "discovery", "--account", "a1", "--gpus", "2", "--time", "04:00:00",
              "--dry-run", "--json", "--run-name", f"d{uuid.uuid4().hex[:8]}", "--", "python", "train.py")
    script = Path(json.loads(dry.stdout)["stages"][0]["script"]).read_text()
    assert "--gres=gpu:v100:2" in script and "--time=04:00:00" in script and "--ntasks-per-node=1" in script
