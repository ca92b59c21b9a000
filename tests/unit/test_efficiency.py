"""Efficiency from sacct (units, steps, arrays, requeues, pending rows), the flags, GPU sampling
with a fake nvidia-smi, and the right-sizing arithmetic (margins, rounding, OOM/TIMEOUT x2,
partition caps, never below a run's peak) through a real ledger with a fake sacct answer."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from hpc_jobs import efficiency as eff
from hpc_jobs.efficiency import (Limits, StageEfficiency, StageHistory, parse_duration_s, parse_size_mb, parse_tres,
                                 parse_usage, plan_stage, round_mem_mb)
from hpc_jobs.spec import Resources, parse_mem_mb

# Real `sacct -D --parsable2 --noheader -o EFF_FIELDS` rows from the dev cluster (Slurm 22.05): a
# 512M job holding 200 MB (job 1, with a fake GPU), a 2-node job, a 2-task job, plus a requeued job
# (two records), an OOM-killed array task and a pending array row (written like sacct prints them).
SACCT = """\
1|COMPLETED|00:00:06|00:05:00|00:03.383|1||512M|billing=1,cpu=1,gres/gpu=1,mem=512M,node=1|1||2026-12-05T23:40:32
1.batch|COMPLETED|00:00:06||00:00.017|1|12256K||cpu=1,gres/gpu=1,mem=512M,node=1|1|1|2026-12-05T23:40:32
1.0|COMPLETED|00:00:06||00:03.366|1|218232K||cpu=1,gres/gpu=1,mem=512M,node=1|1|1|2026-12-05T23:40:32
4|COMPLETED|00:00:02|1-00:00:00|00:00.010|2||600M|billing=2,cpu=2,mem=600M,node=2|2||2026-12-05T23:41:02
4.batch|COMPLETED|00:00:02||00:00.004|1|||cpu=1,mem=300M,node=1|1|1|2026-12-05T23:41:02
4.0|COMPLETED|00:00:01||00:00.006|2|2048K||cpu=2,mem=600M,node=2|2|2|2026-12-05T23:41:02
5|COMPLETED|00:00:02|1-00:00:00|00:00.010|2||400M|billing=2,cpu=2,mem=400M,node=1|1||2026-12-05T23:41:02
5.0|COMPLETED|00:00:01||00:00.006|2|1564K||cpu=2,mem=400M,node=1|1|2|2026-12-05T23:41:02
9|REQUEUED|00:10:00|00:12:00|00:09:30|1||2G|billing=1,cpu=1,gres/gpu=2,mem=2G,node=1|1||2026-12-05T10:10:00
9.batch|CANCELLED|00:10:00||00:09:30|1|1500M||cpu=1,gres/gpu=2,mem=2G,node=1|1|1|2026-12-05T10:10:00
9|COMPLETED|00:05:00|00:12:00|00:04:00|1||2G|billing=1,cpu=1,gres/gpu=2,mem=2G,node=1|1||2026-12-05T10:15:30
9.batch|COMPLETED|00:05:00||00:04:00|1|1.2G||cpu=1,gres/gpu=2,mem=2G,node=1|1|1|2026-12-05T10:15:30
12_0|COMPLETED|00:01:00|01:00:00|00:30.000|4||8G|billing=4,cpu=4,mem=8G,node=1|1||2026-12-05T11:00:00
12_0.batch|COMPLETED|00:01:00||00:30.000|4|1G||cpu=4,mem=8G,node=1|1|1|2026-12-05T11:00:00
12_1|OUT_OF_MEMORY|00:00:30|01:00:00|00:10.000|4||8G|billing=4,cpu=4,mem=8G,node=1|1||2026-12-05T11:00:00
12_1.batch|OUT_OF_MEMORY|00:00:30||00:10.000|4|8G||cpu=4,mem=8G,node=1|1|1|2026-12-05T11:00:00
12_1.extern|COMPLETED|00:00:30||00:00:00|4|-||cpu=4,mem=8G,node=1|1|1|2026-12-05T11:00:00
12_[2-5]|PENDING|00:00:00|01:00:00|00:00:00|4||8G||1||Unknown
13|RUNNING|00:00:10|01:00:00|00:00:00|1||4000Mc|billing=1,cpu=1,node=1|1||Unknown
"""


def test_units():
    assert parse_size_mb("12256K") == pytest.approx(11.97, abs=0.01)
    assert parse_size_mb("512M") == 512 and parse_size_mb("1.5G") == 1536 and parse_size_mb("2T") == 2 * 1024 ** 2
    assert parse_size_mb("1048576") == 1.0  # a bare MaxRSS is bytes
    assert parse_size_mb("4096", default_unit="M") == 4096  # ReqMem / AllocTRES' mem: MB
    assert parse_size_mb("16Gn") == 16384 and parse_size_mb("4000Mc") == 4000
    for nothing in ("", "-", None, "junk", "16X"):
        assert parse_size_mb(nothing) is None
    assert parse_duration_s("00:03.383") == pytest.approx(3.383)
    assert parse_duration_s("1-02:03:04") == 93784 and parse_duration_s("05:00") == 300
    for nothing in ("", "-", "UNLIMITED", "Partition_Limit", "x:y"):
        assert parse_duration_s(nothing) is None
    assert parse_tres("billing=1,cpu=1,gres/gpu=2,mem=512M,node=1") == {
        "billing": "1", "cpu": "1", "gres/gpu": "2", "mem": "512M", "node": "1"}
    assert eff.tres_gpus(parse_tres("cpu=1,gres/gpu:a100=2")) == 2 and eff.tres_gpus({}) == 0


def test_parse_usage_steps_arrays_requeues_and_pending():
    jobs = parse_usage(SACCT)
    assert set(jobs) == {"1", "4", "5", "9", "12_0", "12_1", "13"}  # no step ids, no pending 12_[2-5]
    one = jobs["1"]
    assert one.state == "COMPLETED" and one.gpus == 1 and one.req_mem_mb == 512
    assert one.peak_mem_mb == pytest.approx(218232 / 1024)  # the largest step, not the batch shell
    assert one.cpu_eff == pytest.approx(3.383 / 6) and one.limit_s == 300
    assert one.gpu_hours == pytest.approx(6 / 3600)
    # 2 nodes asking 300M each: per node 300M; a step's MaxRSS is one task's (1 task per node)
    assert jobs["4"].req_mem_mb == 300 and jobs["4"].peak_mem_mb == 2
    # 2 tasks on one node: the node holds both, so the estimate is MaxRSS x 2
    assert jobs["5"].req_mem_mb == 400 and jobs["5"].peak_mem_mb == pytest.approx(2 * 1564 / 1024)
    # a requeued job: both runs count for hours and the time it needed; peak over both; newest state
    nine = jobs["9"]
    assert nine.runs == 2 and nine.state == "COMPLETED"
    assert nine.elapsed_s == 900 and nine.longest_s == 600 and nine.peak_mem_mb == 1500
    assert nine.gpu_hours == pytest.approx(2 * 900 / 3600) and nine.cpu_s == 810
    assert jobs["12_1"].state == "OUT_OF_MEMORY" and jobs["12_1"].peak_mem_mb == 8192
    assert jobs["12_0"].cpu_eff == pytest.approx(30 / 240)
    # still running: no End; an old-style per-CPU ReqMem without a mem TRES
    assert not jobs["13"].final and jobs["13"].req_mem_mb == 4000


def test_stage_flags_and_aggregates():
    jobs = parse_usage(SACCT)
    st = StageEfficiency("train", state="COMPLETED", tasks=[jobs["9"]])
    assert st.flags == []  # 1.5G of 2G, 10 of 12 minutes: well used
    st = StageEfficiency("cmd", state="COMPLETED", tasks=[jobs["1"]])
    assert st.flags == ["time 2%"]  # 213M of 512M = 42%: not flagged; 6 s of 5 min = 2%: flagged
    arr = StageEfficiency("fit", state="COMPLETED", tasks=[jobs["12_0"]])
    assert arr.flags == ["mem 12%", "time 2%"]
    failed = StageEfficiency("fit", state="OUT_OF_MEMORY", tasks=[jobs["12_0"], jobs["12_1"]])
    assert failed.flags == [] and failed.peak_mem_mb == 8192  # a failed stage is not flagged
    gpu = StageEfficiency("train", state="COMPLETED", tasks=[jobs["9"]])
    jobs["9"].gpu_util_mean = 3.0
    assert gpu.flags == ["GPUs idle"]
    jobs["9"].gpu_util_mean = None  # not measured: no flag, "n/a" in the table
    assert gpu.flags == [] and eff.row(gpu)["gpu_util"] == "n/a"
    row = eff.row(arr)
    assert row["mem"] == "1.0G / 8.0G (12%)" and row["cpu"] == "12%" and row["time"].startswith("00:01:00 / 01:00:00")


def _hist(**kw) -> StageHistory:
    h = StageHistory()
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def test_right_sizing_arithmetic():
    res = Resources(mem="32G", time="04:00:00", cpus_per_task=8)
    new, changes = plan_stage("train", res, _hist(runs=3, peak_mem_mb=4.1 * 1024, needed_s=20 * 60, cpus_used=1.2,
                                                  last_state="COMPLETED"), Limits("batch", 64000, 86400, 16))
    # 4.1G x 1.5 = 6298M -> next 256M = 6400M; 20 min x 1.5 + 5 min = 35 min; 1.2 CPUs x 1.5 -> 2
    assert new == {"mem": "6400M", "time": "00:35:00", "cpus_per_task": 2}
    assert [c.line() for c in changes] == [
        "train: mem 32G -> 6400M (peak 4.1G over 3 runs)",
        "train: time 04:00:00 -> 00:35:00 (longest 00:20:00 over 3 runs)",
        "train: cpus 8 -> 2 (1.20 CPUs used over 3 runs)",
    ]
    assert parse_mem_mb(new["mem"]) >= 4.1 * 1024 * 1.5
    # small: at least 256M; rounding under 1G is to 64M
    new, _ = plan_stage("cmd", Resources(mem="2G", time="01:00:00"), _hist(runs=1, peak_mem_mb=253, needed_s=5,
                                                                           last_state="COMPLETED"), Limits())
    assert new == {"mem": "384M", "time": "00:06:00"} and round_mem_mb(100) == 128 and round_mem_mb(9000) == 9216
    # CPUs are never raised
    new, _ = plan_stage("cpu", Resources(mem="4G", cpus_per_task=2), _hist(runs=1, cpus_used=1.9), Limits())
    assert "cpus_per_task" not in new


def test_caps_never_above_the_partition_nor_below_a_peak():
    res = Resources(mem="4G", time="10:00:00")
    new, changes = plan_stage("big", res, _hist(runs=2, peak_mem_mb=7000, needed_s=20 * 3600, last_state="COMPLETED"),
                              Limits("batch", mem_mb=8000, time_s=24 * 3600))
    assert new["mem"] == "8000M" and new["time"] == "1-00:00:00"  # 10.5G and 30h05 capped
    assert "capped at partition batch" in changes[0].why and "capped" in changes[1].why
    # a cap below what a run needed (a smaller partition chosen now): the peak wins
    new, _ = plan_stage("big", res, _hist(runs=1, peak_mem_mb=7000, needed_s=3600, last_state="COMPLETED"),
                        Limits("small", mem_mb=6000))
    assert parse_mem_mb(new["mem"]) >= 7000


def test_killed_for_memory_or_time_gets_more_not_less():
    res = Resources(mem="2G", time="01:00:00")
    # the newest run died OUT_OF_MEMORY at 2G: 4G, even though an older completed run peaked at 300M
    new, changes = plan_stage("fit", res, _hist(runs=1, peak_mem_mb=300, needed_s=600, last_state="OUT_OF_MEMORY",
                                                last_mem_mb=2048, last_limit_s=3600), Limits("batch", 8000, 86400))
    assert new["mem"] == "4G" and "OUT_OF_MEMORY at 2.0G: x2" in changes[0].why
    assert parse_mem_mb(new["mem"]) > parse_mem_mb(res.mem)
    # TIMEOUT at 1 hour: 2 hours (and no CPU cut from a run that did not finish)
    new, changes = plan_stage("fit", Resources(mem="2G", time="01:00:00", cpus_per_task=4),
                              _hist(runs=0, last_state="TIMEOUT", last_mem_mb=2048, last_limit_s=3600, cpus_used=0.5),
                              Limits("batch", 8000, 86400))
    assert new == {"time": "02:00:00"} and changes[0].line() == \
        "fit: time 01:00:00 -> 02:00:00 (the last run hit its time limit 01:00:00: x2)"
    # x2 still capped by the partition
    new, _ = plan_stage("fit", Resources(mem="6G", time="20:00:00"),
                        _hist(last_state="TIMEOUT", last_limit_s=20 * 3600), Limits("batch", 8000, 86400))
    assert new["time"] == "1-00:00:00"


# -- through a ledger: history selection, the cache, the CLI's keep rule ---------------------------
def _ledger_run(root: Path, name: str, created: str, jobs, preset="tiny", cluster="devcluster", resources=None,
                array=None):
    from hpc_jobs.ledger import Run
    from hpc_jobs.record import JobRecord, StageRecord

    run = Run.create(root, "demo", name)
    run.record.update(backend="slurm", cluster=cluster, preset=preset, created=created, order=["train"])
    rec = StageRecord(name="train", resources=resources or {"mem": "2G", "time": "01:00:00", "cpus_per_task": 1},
                      array=array)
    rec.record_submission([JobRecord(job_id=j, tasks=list(range(array or 0))) for j in jobs], time.time())
    run.stages["train"] = rec
    run.save()
    return run


def _stage_fn(ctx):
    return None


def test_right_size_from_history(tmp_path, monkeypatch):
    from hpc_jobs.spec import Pipeline, Stage

    old = _ledger_run(tmp_path, "r1", "2026-12-01T10:00:00", ["9"])  # completed: peak 1.5G, 15 min
    _ledger_run(tmp_path, "r2", "2026-12-02T10:00:00", ["1"], preset="paper")  # another preset: ignored
    _ledger_run(tmp_path, "r3", "2026-12-03T10:00:00", ["1"], cluster="discovery")  # another cluster: ignored
    asked = []

    def fake_query(ids):
        asked.append(sorted(ids))
        return parse_usage(SACCT)

    monkeypatch.setattr(eff, "query_usage", fake_query)
    monkeypatch.setattr(eff.slurm, "available", lambda: True)
    history = eff.earlier_runs(tmp_path, "demo", "tiny", "devcluster")
    assert [r.id for r in history] == ["r1"]

    def pipeline(mem="8G"):
        return Pipeline("demo", [Stage("train", _stage_fn, resources=Resources(mem=mem, time="02:00:00"))])

    p = pipeline()
    changes, notes = eff.right_size(p, history, lambda s: Limits("batch", 8000, 86400, 4))
    assert p["train"].resources.mem == "2304M" and p["train"].resources.time == "00:28:00"  # 1.5G x1.5; 15m x1.5+5
    assert [c.field for c in changes] == ["mem", "time"] and asked == [["9"]]
    # the answer settled long ago: cached in the run directory, no second sacct call
    assert (old.dir / "efficiency.json").exists()
    eff.right_size(pipeline(), history, lambda s: Limits())
    assert asked == [["9"]]
    # a value given on the command line is kept
    p = pipeline()
    changes, notes = eff.right_size(p, history, lambda s: Limits(), keep=lambda stage, f: f == "mem")
    assert p["train"].resources.mem == "8G" and [c.field for c in changes] == ["time"]
    assert any("mem kept as given" in n for n in notes)
    # a newer run of the same stage killed OUT_OF_MEMORY: more memory, from its 8G request
    _ledger_run(tmp_path, "r4", "2026-12-04T10:00:00", ["12"], array=2)  # task 1 OUT_OF_MEMORY
    history = eff.earlier_runs(tmp_path, "demo", "tiny", "devcluster")
    assert [r.id for r in history] == ["r4", "r1"]
    p = pipeline()
    changes, _ = eff.right_size(p, history, lambda s: Limits("batch", 32000, 86400))
    assert p["train"].resources.mem == "16G", [c.line() for c in changes]


def test_no_accounting_means_no_figures(tmp_path, monkeypatch):
    run = _ledger_run(tmp_path, "r1", "2026-12-01T10:00:00", ["9"])
    monkeypatch.setattr(eff.slurm, "available", lambda: True)
    monkeypatch.setattr(eff.slurm, "sacct_text", lambda *a, **k: None)
    monkeypatch.setattr(eff.slurm, "last_sacct_error", "accounting storage is disabled")
    got = eff.for_run(run)
    assert got.source.startswith("no Slurm accounting") and not got.stages["train"].tasks
    assert got.cpu_hours == 0 and eff.flag_lines(run, got) == []


# -- GPU sampling --------------------------------------------------------------------------------
def test_gpu_sampler_without_gpus_says_na(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sampler = eff.GpuSampler()
    sampler.sample()
    assert sampler.fields() == {"gpu": "n/a", "gpu_why": "no visible GPU"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", "/nonexistent")
    sampler = eff.GpuSampler()  # no pynvml here, no nvidia-smi
    sampler.sample()
    assert sampler.fields()["gpu"] == "n/a"


def test_gpu_sampler_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    log = tmp_path / "args"
    smi.write_text(f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                   "print('40, 1000\\n 80, 3000')\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the nvidia-smi path
    sampler = eff.GpuSampler()
    sampler.sample()
    sampler.sample()
    f = sampler.fields()
    assert f == {"gpu_util": 60.0, "gpu_mem_mb": 3000.0, "gpu_util_mean": 60.0, "gpu_mem_peak_mb": 3000.0,
                 "gpu_samples": 2}
    assert "--id=2,3" in log.read_text() and "utilization.gpu,memory.used" in log.read_text()


def test_engine_heartbeat_carries_gpu_fields(tmp_path, monkeypatch):
    from hpc_jobs.engine.outputs import Heartbeat

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hb = Heartbeat(tmp_path / "heartbeat.json", 0.0, total_steps=10, epochs=1)
    hb.beat(step=1, epoch=0.1, loss=1.0, rate=2.0, samples_per_s=4.0, phase="train", force=True)
    data = json.loads((tmp_path / "heartbeat.json").read_text())
    assert data["gpu"] == "n/a" and "gpu_util" not in data and data["step"] == 1


def test_a_failed_job_whose_peak_reached_its_request_was_killed_for_memory():
    """Accounting-enforced memory (OverMemoryKill, no cgroups) records the kill as FAILED; the
    sampled peak at or over the request tells it from an ordinary failure (as on the dev cluster)."""
    text = ("1155|FAILED|00:00:31|00:02:00|00:01.000|1||100M|billing=1,cpu=1,mem=100M,node=1|1||2026-12-06T03:24:45\n"
            "1155.batch|FAILED|00:00:31||00:00.010|1|12148K||cpu=1,mem=100M,node=1|1|1|2026-12-06T03:24:45\n"
            "1155.0|CANCELLED by 0|00:00:31||00:00.900|1|423068K||cpu=1,mem=100M,node=1|1|1|2026-12-06T03:24:45\n"
            "1156|FAILED|00:00:03|00:02:00|00:01.000|1||100M|billing=1,cpu=1,mem=100M,node=1|1||2026-12-06T03:24:45\n"
            "1156.0|FAILED|00:00:03||00:00.900|1|40000K||cpu=1,mem=100M,node=1|1|1|2026-12-06T03:24:45\n")
    jobs = parse_usage(text)
    assert jobs["1155"].state == "OUT_OF_MEMORY" and jobs["1155"].raw_state == "FAILED"
    assert jobs["1156"].state == "FAILED"  # 39M of 100M: it failed for another reason
