"""Efficiency and right-sizing on the dev cluster, from real sacct: a stage that holds ~200 MB
in a 512M job shows about that peak (status, --json, report); `--resources-from RUN --dry-run`
renders a smaller `#SBATCH --mem` and a shorter `--time`, as stated; a stage killed at its time
limit gets twice that limit next time, and one killed for memory twice its memory.

The jobs ask `--acctg-freq=1`: Slurm samples a job's memory every JobAcctGatherFrequency seconds
(30 on the dev cluster), too seldom for a 5-second stage. The runs start at once; the TIMEOUT
one (a 1-minute limit, which the dev cluster enforces at ~60-90 s) sets the test's length. The dev
cluster has no cgroups: Slurm's accounting enforces --mem (JobAcctGatherParams=OverMemoryKill) and
records that kill as FAILED; the sacct peak at the request is what makes it OUT_OF_MEMORY here.
Both killed jobs die without a word: status asks the scheduler about the TIMEOUT one once it is
past its limit, about the one killed for memory once its `alive` file is 90 s old
(hpc_jobs/status.py), hence the longer waits."""

from __future__ import annotations

import json
import re
import uuid

from tests.pipeline_helpers import cli, status_json

from .conftest import JOBS_ROOT, sacct, wait_for

HOLD_MB = 200
HOLD = (f"import time; b = bytearray({HOLD_MB} * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); "
        "time.sleep(5); print('held', len(b))")
# ignores the time-limit signal and SIGTERM, so the wrapper cannot checkpoint and requeue: Slurm
# kills it at its limit (TIMEOUT)
STUCK = ("import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGUSR2, signal.SIGTERM)]; "
         "time.sleep(600)")
GREEDY_MB = 400  # in a 150M job
GREEDY = (f"import time; b = bytearray({GREEDY_MB} * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); "
          "time.sleep(60); print('not killed')")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def _sbatch_value(script: str, key: str) -> str:
    match = re.search(rf"^#SBATCH --{key}=(\S+)$", script, re.M)
    assert match, script
    return match.group(1)


def test_efficiency_from_sacct_and_right_sizing(slurm_cluster):
    home = JOBS_ROOT / f"eff-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    run_opts = ("run", "--cluster", "devcluster", "--sbatch", "acctg-freq=1")
    stuck = json.loads(cli(home, *run_opts, "--time", "1", "--mem", "256M", "--run-name", "stuck", "--json",
                           "--", "python", "-c", STUCK).stdout)
    held = json.loads(cli(home, *run_opts, "--mem", "512M", "--run-name", "held", "--json",
                          "--", "python", "-c", HOLD).stdout)
    job = held["stages"][0]["job_ids"][0]
    cli(home, *run_opts, "--mem", "150M", "--run-name", "greedy", "--json", "--", "python", "-c", GREEDY)

    def ended(run, memory=False):
        def check():
            st = status_json(home, run)["cmd"]
            e = st.get("efficiency")
            # sacct can show the job's end a moment before its step's MaxRSS: status shows n/a until then
            return st if st["state"] in FINAL and e and (e["peak_mem_mb"] is not None or not memory) else None
        return check

    st = wait_for(ended("held", memory=True), 90, "the 200 MB stage to end with sacct figures", poll=1.0)
    assert st["state"] == "COMPLETED", st
    e = st["efficiency"]
    # real sacct: the step's MaxRSS holds the 200 MB plus the Python wrappers (tens of MB), within 512M
    assert HOLD_MB <= e["peak_mem_mb"] <= HOLD_MB + 150, e
    assert e["req_mem_mb"] == 512 and e["limit_s"] == 3600 and e["gpus"] == 0
    assert 0 < e["cpu_efficiency"] <= 1.0 and e["gpu_util_mean"] is None  # no GPU: not measured
    assert e["cpu_hours"] > 0 and e["gpu_hours"] == 0
    assert e["flags"] == ["time <1%"] if e["longest_s"] < 36 else ["time 1%"], e  # ~6 s of 1 hour; memory 40-60%
    one = json.loads(cli(home, "status", "held", "cmd", "--json").stdout)["efficiency"]  # the stage alone
    assert one["peak_mem_mb"] == e["peak_mem_mb"] and [t["job_id"] for t in one["task_list"]] == [job]
    raw = [r for r in sacct(job)]  # the allocation row is final in sacct too
    assert raw and raw[-1]["State"] == "COMPLETED"

    table = cli(home, "status", "held").stdout
    assert "! cmd: used little: ran 00:00:" in table and "of 01:00:00" in table
    assert "--resources-from held" in table
    report = (home / "runs" / "run" / "held" / "report.md")
    cli(home, "report", "held")
    text = report.read_text()
    row = next(l for l in text.splitlines() if l.startswith("| cmd |") and "/ 512M" in l)
    peak = float(re.search(r"\| (\d+)M / 512M", row).group(1))
    assert abs(peak - e["peak_mem_mb"]) <= 1 and "| total |" in text and "CPU-h" in text

    # right-size from it: 2G (the run workflow's default) -> peak x1.5 rounded up to 64M; time 1h -> 6 min
    dry = cli(home, *run_opts, "--resources-from", "held", "--dry-run", "--", "python", "-c", "pass").stdout
    mem = _sbatch_value(dry, "mem")
    assert mem.endswith("M") and e["peak_mem_mb"] * 1.5 <= int(mem[:-1]) < 512, dry
    assert _sbatch_value(dry, "time") == "00:06:00"
    assert f"cmd: mem 2G -> {mem} (peak {round(e['peak_mem_mb'])}M over 1 run)" in dry
    assert "cmd: time 01:00:00 -> 00:06:00 (longest 00:00:" in dry

    # the stage killed for memory: FAILED in Slurm's words, the memory hint, twice the memory next time
    st = wait_for(ended("greedy", memory=True), 240, "the 400 MB stage in 150M to be killed", poll=1.0)
    assert st["state"] == "FAILED" and st["efficiency"]["peak_mem_mb"] >= 150, st
    text = cli(home, "status", "greedy").stdout
    assert "exceeded job memory limit" in text.lower() or "exceeded memory limit" in text.lower(), text
    dry = cli(home, *run_opts, "--resources-from", "greedy", "--dry-run", "--", "python", "-c", "pass").stdout
    assert _sbatch_value(dry, "mem") == "320M", dry  # 150M x2, rounded up to a multiple of 64M
    assert "cmd: mem 2G -> 320M (the last run was OUT_OF_MEMORY at 150M: x2)" in dry, dry

    # the stage killed at its 1-minute limit gets 2 minutes, not less
    st = wait_for(ended("stuck"), 240, "the 1-minute stage to reach its time limit", poll=2.0)
    assert st["state"] == "TIMEOUT", st
    dry = cli(home, *run_opts, "--resources-from", "stuck", "--dry-run", "--", "python", "-c", "pass").stdout
    assert _sbatch_value(dry, "time") == "00:02:00", dry
    assert "cmd: time 01:00:00 -> 00:02:00 (the last run hit its time limit 00:01:00: x2)" in dry
    recorded = json.loads(next((home / "runs" / "run").glob("2*/run.json")).read_text())["right_sized"]
    assert recorded["runs"] and recorded["changes"]
