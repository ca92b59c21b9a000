"""Where am I running: the one object that reads Slurm / torchrun variables.

User code never parses ``SLURM_*`` itself: it asks ``RunEnv.detect()``. This module is imported on
the launch path and by the job bootstrap, so it must not import torch.

Precedence:
1. A Slurm task started by ``srun`` (``SLURM_PROCID`` and ``SLURM_STEP_ID`` set): rank, world size
   and node layout come from Slurm, the master is the first host of ``SLURM_JOB_NODELIST`` and the
   port is derived from the job id.
2. torchrun or hand-set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
   (also inside a Slurm step: torchrun's children share one ``SLURM_PROCID``).
3. A single process.
Inside a Slurm job, cases 2 and 3 still carry the job facts (job id, array task, restart count,
cpus per task), so requeue works. The batch script itself (no ``SLURM_STEP_ID``) is case 3 even
when ``SLURM_NTASKS`` > 1: it is one process, and counting it as several would hang the first
collective. ``MASTER_ADDR`` and ``MASTER_PORT``, when set, override the derived master.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

DEFAULT_PORT = 29500
PORT_BASE = 20000
PORT_SPAN = 20000


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist: ``"n[1-2]"`` -> ``["n1", "n2"]``, ``"a1,b[3,5-6]"`` ->
    ``["a1", "b3", "b5", "b6"]``. Zero padding (``n[01-03]``) and several bracket groups in one
    name (``r[1-2]n[1-2]``) are kept. Raises ValueError on unbalanced brackets or bad ranges."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad hostlist {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"bad hostlist {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    out = []
    for value in _expand_ranges(match.group(1), item):
        out.extend(_expand_one(prefix + value + suffix))
    return out


def _expand_ranges(spec: str, item: str) -> list[str]:
    values = []
    for part in spec.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            values.append(part)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise ValueError(f"bad hostlist range {part!r} in {item!r}: expected N or N-M with N <= M")
        width = len(m.group(1))
        values.extend(str(i).zfill(width) for i in range(int(m.group(1)), int(m.group(2)) + 1))
    return values


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE {spec!r}: expected e.g. '2(x3),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _visible_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip() in ("", "-1", "NoDevFiles"):
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask: a Slurm task's own CPUs)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunEnv:
    """Rank, node layout and job facts of this process (immutable; build with ``detect()``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    job_id: str | None = None
    array_task_id: int | None = None
    restart_count: int = 0
    cpus_per_task: int = 1
    gpus: tuple[str, ...] = field(default=())
    is_slurm: bool = False
    array_job_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def requeue_target(self) -> str | None:
        """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for array tasks, else the job id."""
        if not self.is_slurm or self.job_id is None:
            return None
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> "RunEnv":
        """Read the environment (``os.environ`` unless a mapping is given; tests pass dicts)."""
        env = os.environ if env is None else env
        step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
        if env.get("SLURM_PROCID") is not None and step is not None and env.get("TORCHELASTIC_RUN_ID") is None:
            return cls._from_slurm(env)
        if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
            found = cls._from_torchrun(env)
        else:
            found = cls._single(env)
        if env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"):
            cpus = _int(env, "SLURM_CPUS_PER_TASK", None)
            found = replace(found, **cls._slurm_job_facts(env), **({"cpus_per_task": cpus} if cpus else {}))
        return found

    @staticmethod
    def _slurm_job_facts(env: Mapping[str, str]) -> dict:
        return dict(
            job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"),
            array_job_id=env.get("SLURM_ARRAY_JOB_ID"),
            array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
            is_slurm=True,
        )

    @classmethod
    def _from_slurm(cls, env: Mapping[str, str]) -> "RunEnv":
        facts = cls._slurm_job_facts(env)
        rank = _int(env, "SLURM_PROCID", 0)
        world = _int(env, "SLURM_NTASKS", None) or _int(env, "SLURM_NPROCS", 1)
        node_rank = _int(env, "SLURM_NODEID", 0)
        num_nodes = _int(env, "SLURM_JOB_NUM_NODES", None) or _int(env, "SLURM_NNODES", 1)
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if tasks_per_node:  # exact per node, also for uneven layouts
            per_node = expand_tasks_per_node(tasks_per_node)
            local_world = per_node[min(node_rank, len(per_node) - 1)]
        elif env.get("SLURM_NTASKS_PER_NODE"):
            local_world = _int(env, "SLURM_NTASKS_PER_NODE")
        else:
            local_world = max(1, world // max(1, num_nodes))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        hosts = expand_hostlist(nodelist) if nodelist else []
        master = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        job_id = facts["job_id"]
        derived = PORT_BASE + int(job_id) % PORT_SPAN if job_id and job_id.isdigit() else DEFAULT_PORT
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master,
            master_port=_int(env, "MASTER_PORT", derived),
            cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK", None) or max(1, cpu_count() // local_world),
            gpus=_visible_gpus(env),
            **facts,
        )

    @classmethod
    def _from_torchrun(cls, env: Mapping[str, str]) -> "RunEnv":
        rank = _int(env, "RANK", 0)
        world = _int(env, "WORLD_SIZE", 1)
        local_rank = _int(env, "LOCAL_RANK", rank)
        local_world = _int(env, "LOCAL_WORLD_SIZE", None) or world
        node_rank = _int(env, "GROUP_RANK", None)
        if node_rank is None:
            node_rank = rank // max(1, local_world)
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=max(1, -(-world // max(1, local_world))),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            cpus_per_task=max(1, cpu_count() // local_world),
            gpus=_visible_gpus(env),
        )

    @classmethod
    def _single(cls, env: Mapping[str, str]) -> "RunEnv":
        return cls(
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            cpus_per_task=cpu_count(),
            gpus=_visible_gpus(env),
        )

    def stop_cause(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                   now: float | None = None) -> str | None:
        """Why the requeue signal came, asked of the controller when it arrives: ``PREEMPTED``
        (Slurm chose this run of the job for preemption: PreemptTime is set), ``TIMEOUT`` (the
        time limit is within the signal lead plus Slurm's 30 s check interval and a margin), else
        ``REQUEUED`` (``scancel --signal``, ``scontrol requeue``, a site script). None outside
        Slurm or when scontrol does not answer. Never raises."""
        import datetime as _dt
        import time as _time

        target = self.requeue_target
        if target is None:
            return None
        try:
            result = run(["scontrol", "show", "job", "-o", target], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        if result.returncode != 0:
            return None
        fields = dict(tok.split("=", 1) for tok in (result.stdout or "").split() if "=" in tok)

        def stamp(name: str) -> float | None:
            try:
                return _dt.datetime.fromisoformat(fields.get(name, "")).timestamp()
            except ValueError:
                return None

        preempted, started, end = stamp("PreemptTime"), stamp("StartTime"), stamp("EndTime")
        if preempted is not None and (started is None or preempted >= started):
            return "PREEMPTED"
        lead = float(os.environ.get("HPC_JOBS_SIGNAL_LEAD_S") or 300)
        if end is not None and end - (_time.time() if now is None else now) <= lead + 60:
            return "TIMEOUT"
        return "REQUEUED"

    def requeue(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
        """Ask Slurm to requeue this job (array tasks by ``ARRAYJOB_TASK``). Returns False outside
        Slurm or when ``scontrol`` refuses (its message goes to stderr); never raises."""
        target = self.requeue_target
        if target is None:
            return False
        cmd: Sequence[str] = ["scontrol", "requeue", target]
        try:
            result = run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"[hpc-jobs] requeue of job {target} failed: {exc}", file=sys.stderr, flush=True)
            return False
        if result.returncode != 0:
            err = (result.stderr or result.stdout or "").strip()
            print(f"[hpc-jobs] 'scontrol requeue {target}' exited {result.returncode}: {err} "
                  "(is the job requeueable? JobRequeue=1 or sbatch --requeue)", file=sys.stderr, flush=True)
            return False
        return True


_PENDING_SIGNALS: list[int] = []


def _record_signal(signum: int, frame: object) -> None:
    _PENDING_SIGNALS.append(signum)


def catch_stop_signals(requeue_signal: str = "USR2") -> None:
    """Call first thing in a job process (before importing torch or loading data): the requeue
    signal and SIGTERM are only recorded until the training engine takes them over, so one that
    arrives during start-up does not kill the process (USR2's default action) and the engine acts
    on it at its first step boundary. Main thread only."""
    for signum in {getattr(signal, "SIG" + requeue_signal.upper().removeprefix("SIG")), signal.SIGTERM}:
        signal.signal(signum, _record_signal)


def take_pending_signals() -> list[int]:
    """Signals recorded by ``catch_stop_signals`` so far (cleared by this call)."""
    pending = list(_PENDING_SIGNALS)
    _PENDING_SIGNALS.clear()
    return pending
