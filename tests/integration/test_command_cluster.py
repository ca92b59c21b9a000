"""`python launch.py run -- CMD` on the dev cluster: the time-limit signal reaches the wrapped script,
which checkpoints and exits; the job is requeued and the script resumes from its own checkpoint."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from tests.pipeline_helpers import cli, status_json

from .conftest import JOBS_ROOT, sacct, wait_for


def test_wrapped_script_is_requeued_on_the_signal_and_resumes_from_its_checkpoint(slurm_cluster):
    home = JOBS_ROOT / f"cmd-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    out = json.loads(cli(home, "run", "--cluster", "devcluster", "--time", "00:10:00", "--run-name", "rq", "--json",
                         "--", "python", "docs/scripts/train_script.py", "--steps", "150",
                         "--step-seconds", "0.1").stdout)
    job = out["stages"][0]["job_ids"][0]
    log = Path(out["run_dir"]) / "stages" / "cmd" / "slurm" / f"{job}_0_log.out"
    wait_for(lambda: log.exists() and "starting at step 0" in log.read_text(), 60, "the script to start", poll=0.3)
    wait_for(lambda: "state.json" in [p.name for p in (Path(out["run_dir"]) / "stages/cmd/checkpoints").iterdir()],
             60, "a first checkpoint", poll=0.3)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)

    def done():
        st = status_json(home, "rq")["cmd"]
        return st if st["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None
    st = wait_for(done, 180, "the requeued job to finish", poll=1.0)
    text = log.read_text()
    assert st["state"] == "COMPLETED", (st, text)
    assert "time-limit signal: checkpoint at step" in text
    resumed = [l for l in text.splitlines() if l.startswith("starting at step") and "(restart 1" in l]
    assert resumed and int(resumed[0].split()[3]) > 0, text  # not from scratch
    assert "done: step 150" in text
    assert [i["cause"] for i in st["interruptions"]] == ["REQUEUED"], st["interruptions"]
    assert sacct(job)[-1]["State"] == "COMPLETED"
