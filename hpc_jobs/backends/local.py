"""Local backend: run a pipeline's stages on this machine, in dependency order.

Each stage task runs as ``python -m hpc_jobs.runtime RUN_DIR STAGE [--task I]`` with the run's code
snapshot on PYTHONPATH, exactly the runner a Slurm job would unpickle. A stage with ``--gpus N``
runs N ranks (torchrun-style RANK/WORLD_SIZE/MASTER_ADDR variables); without a GPU they use gloo
on the CPU. Rank 0's output streams to the terminal, prefixed with the stage name; every rank's
output is kept in ``stages/<name>/local/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pump(stream, log: TextIO, echo: Optional[Callable[[str], None]]) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        if echo:
            echo(line.rstrip("\n"))
    stream.close()


class LocalBackend:
    name = "local"

    def __init__(self, python: str = sys.executable):
        self.python = python

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
        codes = self._wait(procs)
        for thread in threads:
            thread.join(timeout=5)
        for log in logs:
            log.close()
        bad = [c for c in codes if c != 0]
        return bad[0] if bad else 0

    @staticmethod
    def _wait(procs: List[subprocess.Popen]) -> List[int]:
        """Wait for all ranks; if one fails, stop the others (they would hang in a collective)."""
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes  # type: ignore[return-value]
            if any(c not in (None, 0) for c in codes):
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
                return [p.returncode for p in procs]
            time.sleep(0.1)
