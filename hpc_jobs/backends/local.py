"""Local backend: run a pipeline's stages on this machine, in dependency order.

``LocalBackend.start(run, selection)`` runs the selected stage tasks in order (every stage of a
local run; the launch-time stages of any run). A task whose per-task parent task, or any task of a
whole-stage parent, did not complete is CANCELLED; its siblings run.

Each stage task runs as ``python -m hpc_jobs.runtime RUN_DIR STAGE [--task I]`` with the run's code
snapshot on PYTHONPATH, exactly the runner a Slurm job would unpickle. A stage with ``--gpus N``
runs N ranks (torchrun-style RANK/WORLD_SIZE/MASTER_ADDR variables); without a GPU they use gloo
on the CPU. Rank 0's output streams to the terminal, prefixed with the stage name; every rank's
output is kept in ``stages/<name>/local/``.

An array's tasks run side by side as far as the CPUs allow (``task_slots``): up to 4 at once,
never more than the stage's ``array_parallelism``; ``HPC_JOBS_LOCAL_PARALLEL=N`` sets the number
(1: one after the other). With CUDA on the machine a GPU stage's tasks run one after the other,
since each rank takes the device its local rank names.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from .. import states as statesmod
from ..environment import cpu_count


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: how many tasks of one array run at once on the local backend (default: ``task_slots``)
PARALLEL_ENV = "HPC_JOBS_LOCAL_PARALLEL"
MAX_SLOTS = 4  # each task is a whole Python process with torch loaded: mind the memory


def parallel_setting() -> Optional[int]:
    """``HPC_JOBS_LOCAL_PARALLEL`` as a number, None when unset; a UserError when it is no number."""
    from ..errors import UserError

    value = os.environ.get(PARALLEL_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{PARALLEL_ENV} must be a whole number of tasks, 1 or more (got {value!r})")
    return int(value)


def task_slots(n_tasks: int, world: int, gpu_stage: bool, throttle: Optional[int] = None) -> int:
    """How many of an array's ``n_tasks`` tasks (``world`` ranks each) run at once here:
    ``HPC_JOBS_LOCAL_PARALLEL`` if set; else one at a time for a GPU stage on a machine with CUDA
    (the ranks of two tasks would share devices); else one rank per CPU, at most ``MAX_SLOTS``.
    Never more than the stage's own ``throttle`` (its ``array_parallelism``, Slurm's %K)."""
    slots = parallel_setting()
    if slots is None:
        slots = 1 if gpu_stage and has_cuda() else min(MAX_SLOTS, cpu_count() // max(1, world))
    return max(1, min(slots, n_tasks, throttle or n_tasks))


def _pump(stream, log: TextIO, echo: Optional[Callable[[str], None]]) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        if echo:
            echo(line.rstrip("\n"))
    stream.close()


def has_cuda() -> bool:
    """Cheap check without importing torch: a visible NVIDIA device node."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def blocked_by(run: Any, rec: Any, task: Optional[int], not_done: Dict[str, set]) -> Optional[str]:
    """The parent that keeps ``task`` of ``rec`` from running (a per-task parent's same task, or any
    task of a whole-stage parent, did not complete); None when it may run."""
    per_task = set(rec.per_task_parents())
    for parent in rec.depends_on:
        bad = not_done.get(parent)
        if not bad:
            continue
        if parent in per_task and rec.array and run.stage(parent).array:
            if task in bad:
                return f"{parent}[{task}]"
        else:
            return parent
    return None


class LocalBackend:
    name = "local"

    def __init__(self, python: str = sys.executable):
        self.python = python

    # -- the backend interface -------------------------------------------------------------------
    def start(self, run: Any, selection: Dict[str, List[Optional[int]]], echo: Callable[[str], None],
              active: Optional[Dict[str, List[str]]] = None) -> Dict[str, set]:
        """Run the selected stage tasks here, in order; return the tasks that did not complete,
        per stage (empty when all did)."""
        from ..runtime import read_marker

        parallel_setting()  # a bad HPC_JOBS_LOCAL_PARALLEL fails before any stage runs
        said: List[bool] = []

        def gpus_note(world: int) -> None:
            if not said and not has_cuda():
                said.append(True)
                echo(f"no GPU on this machine: {world} ranks run with gloo on the CPU")

        def marker_state(name: str, task: Optional[int]) -> Optional[str]:
            try:
                marker = read_marker(run.stage_dir(name), task)
            except (ValueError, OSError):
                return None
            return marker.get("state") if isinstance(marker, dict) else None

        not_done: Dict[str, set] = {}
        for name, tasks in selection.items():
            rec = run.stage(name)
            blocked = {t: blocked_by(run, rec, t, not_done) for t in tasks}
            runnable = [t for t in tasks if blocked[t] is None]
            for task, parent in blocked.items():
                if parent is not None:
                    rec.task_state[str(task)] = "CANCELLED"
                    echo(f"[{name}{'' if task is None else f':{task}'}] cancelled: upstream '{parent}' did not complete")
            if runnable:
                run.set_state(name, "RUNNING", started=time.time(), ended=None)
                codes = self.run_stage(run, name, echo, gpus_note, runnable)
                for task, code in codes.items():
                    rec.task_state[str(task)] = "COMPLETED" if code == 0 else "FAILED"
                    if code != 0:
                        echo(f"[{name}{'' if task is None else f':{task}'}] FAILED (exit code {code}); "
                             f"logs: {run.stage_dir(name) / 'local'}")
                bad = [c for c in codes.values() if c != 0]
                rec.exit_code = bad[0] if bad else 0
                rec.attempts += 1
            states = [rec.task_state.get(str(t), "COMPLETED" if marker_state(name, t) == "COMPLETED" else "PLANNED")
                      for t in rec.task_indices]
            reason = "" if runnable else f"upstream '{next(iter(blocked.values()))}' did not complete"
            run.set_state(name, statesmod.aggregate(states), ended=time.time(), reason=reason)
            failed = {t for t in rec.task_indices if rec.task_state.get(str(t)) in statesmod.FAILED}
            if failed:
                not_done[name] = failed
        return not_done

    def run_stage(self, run: Any, name: str, echo: Callable[[str], None],
                  gpus_note: Callable[[int], None] = lambda n: None,
                  tasks: Optional[Sequence[Optional[int]]] = None) -> Dict[Optional[int], int]:
        """Run tasks of one stage here, each with the stage's ranks, ``task_slots`` of them at a
        time; their exit codes, in task order."""
        rec = run.stage(name)
        world = rec.world_size
        if world > 1:
            gpus_note(world)
        tasks = list(rec.task_indices if tasks is None else tasks)
        slots = task_slots(len(tasks), world, rec.kind == "gpu", rec.array_parallelism)
        threads = max(1, cpu_count() // (max(1, world) * slots))
        lock = threading.Lock()  # tasks side by side: one whole line at a time on the terminal

        def one(task: Optional[int]) -> int:
            tag = f"[{name}] " if task is None else f"[{name}:{task}] "

            def say(line: str) -> None:
                with lock:
                    echo(tag + line)
            return self.run_task(run.dir, name, task, world, rec.ranks_per_node, echo=say,
                                 threads_per_rank=threads)

        if slots == 1:
            return {task: one(task) for task in tasks}
        pool = ThreadPoolExecutor(slots, thread_name_prefix=f"local-{name}")
        try:
            futures = [(task, pool.submit(one, task)) for task in tasks]
            return {task: future.result() for task, future in futures}
        finally:  # Ctrl-C: start no further task; the running ones end with their ranks
            pool.shutdown(wait=True, cancel_futures=True)

    def run_task(
        self,
        run_dir: Path,
        stage: str,
        task: Optional[int],
        world_size: int,
        ranks_per_node: int,
        echo: Optional[Callable[[str], None]] = None,
        extra_env: Optional[Dict[str, str]] = None,
        threads_per_rank: int = 1,
    ) -> int:
        """Run one task of a stage with ``world_size`` ranks; return the worst exit code."""
        stage_dir = run_dir / "stages" / stage
        log_dir = stage_dir / "local"
        log_dir.mkdir(parents=True, exist_ok=True)
        code_dir = run_dir / "code"
        base_env = dict(os.environ)
        base_env["PYTHONPATH"] = str(code_dir) + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
        base_env["HPC_JOBS_RUN_DIR"] = str(run_dir)
        base_env["HPC_JOBS_STAGE"] = stage
        base_env["PYTHONUNBUFFERED"] = "1"
        base_env.setdefault("OMP_NUM_THREADS", str(threads_per_rank))
        for key in [k for k in base_env if k.startswith("SLURM_")]:
            del base_env[key]  # a local run inside an allocation must not pose as a Slurm task
        base_env.update(extra_env or {})
        port = free_port()
        cmd = [self.python, "-m", "hpc_jobs.runtime", str(run_dir), stage]
        if task is not None:
            cmd += ["--task", str(task)]
        procs = []
        threads = []
        logs = []
        tag = f"task{task}." if task is not None else ""
        for rank in range(world_size):
            env = dict(base_env)
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank % ranks_per_node),
                LOCAL_WORLD_SIZE=str(ranks_per_node),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            log = open(log_dir / f"{tag}rank{rank}.log", "a")
            logs.append(log)
            proc = subprocess.Popen(
                cmd, env=env, cwd=str(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, bufsize=1, start_new_session=False,
            )
            procs.append(proc)
            thread = threading.Thread(target=_pump, args=(proc.stdout, log, echo if rank == 0 else None), daemon=True)
            thread.start()
            threads.append(thread)
        codes, first = self._wait(procs)
        for thread in threads:
            thread.join(timeout=5)
        for log in logs:
            log.close()
        if first is None:
            return 0
        if first != 0 and echo is not None:  # only rank 0 is echoed: show why the failing rank ended
            from ..status import tail_lines

            path = log_dir / f"{tag}rank{first}.log"
            echo(f"rank {first} exited {codes[first]} first; the end of {path}:")
            for line in tail_lines(path, 15):
                echo(f"  rank {first}| {line}")
        return codes[first]

    @staticmethod
    def _wait(procs: List[subprocess.Popen]) -> Tuple[List[int], Optional[int]]:
        """Wait for all ranks; if one fails, stop the others (they would hang in a collective).
        Returns every rank's exit code and the rank that failed on its own first (None: all 0)."""
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                bad = [r for r, c in enumerate(codes) if c != 0]
                return codes, (bad[0] if bad else None)  # type: ignore[return-value]
            if any(c not in (None, 0) for c in codes):
                first = next(r for r, c in enumerate(codes) if c not in (None, 0))
                deadline = time.time() + 10
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    try:
                        p.wait(timeout=max(0.1, deadline - time.time()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                return [p.returncode for p in procs], first
            time.sleep(0.1)
