"""Inside a job: resolve the stage's inputs, run its entry point, leave state markers.

The same :class:`StageRunner` object runs a stage everywhere: submitit unpickles it in each Slurm
task; the local backend and launch-time stages run ``python -m hpc_jobs.runtime RUN_DIR STAGE``,
which loads the pickle written at launch. Inputs are checked in the first seconds (a missing or
incomplete checkpoint fails the job before any data is loaded). Rank 0 writes
``stages/<name>/state[.<task>].json``: the stage's own record of how it ended, read by ``status``
when the scheduler has forgotten the job (no accounting, or after MinJobAge).
"""

from __future__ import annotations

import argparse
import json
import datetime as _dt
import logging
import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import StageInputError, command
from .fsutil import atomic_write_bytes, atomic_write_json, read_json
from .interrupts import Requeued
from .spec import BestCheckpoint, Input

log = logging.getLogger("hpc_jobs")

RUNNER_FILE = "runner.pkl"
ALIVE_FILE = "alive"  # touched by a running task's rank 0 every ALIVE_EVERY_S
ALIVE_EVERY_S = 30.0


def task_dir(stage_dir: Path, task: Optional[int]) -> Path:
    """Where a stage task keeps its files: the stage's directory for a plain job,
    ``stages/<name>/tasks/<i>/`` for array task ``i`` (its checkpoints, metrics, heartbeat,
    marker and attempt log; nothing there is shared with another task)."""
    return stage_dir if task is None else stage_dir / "tasks" / str(task)


def marker_path(stage_dir: Path, task: Optional[int]) -> Path:
    return task_dir(stage_dir, task) / "state.json"


def alive_path(stage_dir: Path, task: Optional[int]) -> Path:
    return task_dir(stage_dir, task) / ALIVE_FILE


class _Alive:
    """While a task runs, its rank 0 touches ``alive`` every ALIVE_EVERY_S seconds (a daemon
    thread, so a step that holds the main thread for an hour still shows). ``status`` trusts a
    RUNNING marker without asking the scheduler only while this is fresh: a job killed from
    outside (time limit, memory, scancel, its node gone) stops touching it and is asked about."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = path
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hpc-jobs-alive", daemon=True)

    def start(self) -> "_Alive":
        self.path.touch()
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopped.wait(ALIVE_EVERY_S):
            try:
                self.path.touch()
            except OSError as exc:  # a full or unmounted file system: say so once, keep the job running
                log.warning("cannot touch %s (%s): status will ask the scheduler about this job", self.path, exc)
                return

    def stop(self) -> None:
        self.stopped.set()


def read_marker(stage_dir: Path, task: Optional[int] = None) -> Optional[Dict[str, Any]]:
    return read_json(marker_path(stage_dir, task))


def attempts_path(stage_dir: Path, task: Optional[int]) -> Path:
    return task_dir(stage_dir, task) / "attempts.jsonl"


def read_attempts(stage_dir: Path, task: Optional[int] = None) -> List[Dict[str, Any]]:
    """The stage's attempt log: a ``start`` line per process start and an ``end`` line per end
    (state, cause, step), appended by rank 0; an end nobody witnessed (SIGKILL, node loss) is
    added at the next start from Slurm's record."""
    import json

    try:
        lines = attempts_path(stage_dir, task).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _append_attempt(stage_dir: Path, task: Optional[int], entry: Dict[str, Any]) -> None:
    import json

    with open(attempts_path(stage_dir, task), "a") as fh:  # one short O_APPEND write per line
        fh.write(json.dumps({"time": time.time(), **entry}, default=str) + "\n")


# Slurm's words that say more than the process could (it was killed or cut off from outside)
SLURM_CAUSES = ("NODE_FAIL", "PREEMPTED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL")


def _slurm_end_state(job_id: Optional[str], attempt: int) -> Optional[str]:
    """How run ``attempt`` of ``job_id`` ended according to accounting (``sacct -D``); None
    without accounting."""
    import shutil
    import subprocess

    if not job_id or not shutil.which("sacct"):
        return None
    try:
        proc = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", str(job_id)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    states = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []
    return states[attempt] if 0 <= attempt < len(states) else None


def _close_previous_attempt(stage_dir: Path, task: Optional[int]) -> None:
    """Give the previous attempt an end (and Slurm's cause) if the process could not write one."""
    entries = read_attempts(stage_dir, task)
    starts = [e for e in entries if e.get("event") == "start"]
    if not starts:
        return
    last = starts[-1]
    key = (last.get("job_id"), last.get("attempt"))
    ends = [e for e in entries if e.get("event") == "end" and (e.get("job_id"), e.get("attempt")) == key]
    end = ends[-1] if ends else None
    if end is not None and (end.get("state") == "COMPLETED" or end.get("cause") in ("PREEMPTED", "TIMEOUT", "REQUEUED")):
        return  # the engine knew why
    slurm_state = _slurm_end_state(last.get("job_id"), int(last.get("attempt") or 0))
    if slurm_state in SLURM_CAUSES or end is None:
        _append_attempt(stage_dir, task, {
            "event": "end", "job_id": key[0], "attempt": key[1], "seen": False,
            "state": (end or {}).get("state") or slurm_state or "UNKNOWN",
            "cause": slurm_state or "UNKNOWN", "step": (end or {}).get("step")})


# set by StageRunner.checkpoint when submitit's own handler requeues the job (a requeue signal
# outside the engine's fit(): during start-up, or in a stage without the engine)
_requeue_cause: Optional[str] = None


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RequeueLimitError(RuntimeError):
    """A stage came back more often than its ``max_requeues``: stop the loop."""


@dataclass
class StageContext:
    """What a stage's entry point receives."""

    run_dir: Path
    stage: str
    out_dir: Path
    config: Any
    inputs: Dict[str, Union[Path, List[Path]]]
    input_kinds: Dict[str, str]
    task_index: Optional[int]
    num_tasks: int
    data_root: Path
    env: Any = None  # hpc_jobs.environment.RunEnv
    extra: Dict[str, Any] = field(default_factory=dict)

    def output(self, name: str, outputs: Optional[Dict[str, Any]] = None) -> Path:
        """Where this task writes output ``name`` (a BestCheckpoint output: its directory)."""
        rel = (outputs or self.extra.get("outputs", {}))[name]
        if isinstance(rel, BestCheckpoint):
            rel = rel.directory
        return self.out_dir / rel.format(task=self.task_index if self.task_index is not None else 0)

    def heartbeat(self, **fields: Any) -> None:
        """Progress for ``status``: step/total/loss/... (rank 0 only; cheap, atomic)."""
        if self.env is not None and not getattr(self.env, "is_main", True):
            return
        atomic_write_json(self.out_dir / "heartbeat.json", {"time": time.time(), **fields})


@dataclass
class StageRunner:
    """A picklable callable: one stage (or one task of an array stage) of one run."""

    run_dir: str
    stage: str
    fn: Any
    config: Any
    inputs: Dict[str, Input]
    outputs: Dict[str, Any]
    #: upstream stage -> {"array": N or None, "outputs": {name: path or BestCheckpoint}}
    upstream: Dict[str, Dict[str, Any]]
    data_root: str
    task_index: Optional[int] = None
    num_tasks: int = 1
    max_requeues: int = 20
    #: a swept stage: the config of each sweep point; task k runs with point k's
    point_configs: Optional[List[Any]] = None

    def for_task(self, task: Optional[int]) -> "StageRunner":
        clone = StageRunner(**{**self.__dict__, "task_index": task})
        return clone

    # -- input resolution -----------------------------------------------------------------------
    def resolve_inputs(self) -> Dict[str, Union[Path, List[Path]]]:
        """Upstream output paths; verify checkpoints now, so a bad handoff fails in seconds.

        From a plain stage: one path. From an array: task i's output for task i (``per_task``),
        else the list of every task's output in task order."""
        resolved: Dict[str, Union[Path, List[Path]]] = {}
        for name, inp in self.inputs.items():
            up = self.upstream.get(inp.stage) or {}
            out = (up.get("outputs") or {}).get(inp.output)
            if out is None:
                raise StageInputError(f"stage '{self.stage}': stage '{inp.stage}' declares no output '{inp.output}'")
            stage_dir = Path(self.run_dir) / "stages" / inp.stage
            if up.get("array"):
                tasks: List[Optional[int]] = [self.task_index] if inp.per_task else list(range(int(up["array"])))
            else:
                tasks = [None]
            paths = [self._output_path(name, inp, out, task_dir(stage_dir, t), t) for t in tasks]
            for path in paths:
                self._check(name, inp, path)
            resolved[name] = paths if (up.get("array") and not inp.per_task) else paths[0]
        return resolved

    def _output_path(self, name: str, inp: Input, out: Any, where: Path, task: Optional[int]) -> Path:
        if isinstance(out, BestCheckpoint):
            from .checkpoint import best_complete

            found = best_complete(where / out.directory, out.metric, out.mode)
            if found is None:
                which = f" task {task}" if task is not None else ""
                raise StageInputError(
                    f"stage '{self.stage}' cannot start: its input '{name}' is the {out.describe()} of stage "
                    f"'{inp.stage}'{which}, and {where / out.directory} holds no complete checkpoint with a "
                    f"'{out.metric}' metric. Did '{inp.stage}' validate? ({command()} status {Path(self.run_dir).name})"
                )
            log.info("input %s: %s of %s%s = %s (%s=%.6g, step %d)", name, out.describe(), inp.stage,
                     f"[{task}]" if task is not None else "", found[0], out.metric, found[1].metrics[out.metric],
                     found[1].step)
            return found[0]
        return where / str(out).format(task=task if task is not None else 0)

    def _check(self, name: str, inp: Input, path: Path) -> None:
        if inp.kind in ("init", "resume"):
            from .checkpoint import CheckpointError, verify_checkpoint

            try:
                verify_checkpoint(str(path))
            except CheckpointError as exc:
                raise StageInputError(
                    f"stage '{self.stage}' cannot start: its {inp.kind} input '{name}' from stage "
                    f"'{inp.stage}' is not a complete checkpoint ({exc}). Rerun '{inp.stage}' "
                    f"({command()} resume RUN) before this stage."
                ) from None
        elif not path.exists():
            raise StageInputError(
                f"stage '{self.stage}' cannot start: input '{name}' ({path}) from stage '{inp.stage}' "
                f"does not exist. Did '{inp.stage}' complete? ({command()} status {Path(self.run_dir).name})"
            )

    # -- running --------------------------------------------------------------------------------
    def __call__(self) -> Any:
        from .environment import RunEnv

        env = RunEnv.detect()
        stage_dir = Path(self.run_dir) / "stages" / self.stage
        out_dir = task_dir(stage_dir, self.task_index)
        marker = marker_path(stage_dir, self.task_index)
        main = env.rank == 0
        started = time.time()
        base = {
            "stage": self.stage,
            "task": self.task_index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": _slurm_job_id(),
            "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "started": _now(),
        }
        out_dir.mkdir(parents=True, exist_ok=True)  # every rank: a task's own directory
        what = f"stage {self.stage}" + (f" task {self.task_index}/{self.num_tasks}" if self.task_index is not None else "")
        print(f"[hpc_jobs] attempt {base['attempt'] + 1} of {what} on {base['host']}"
              + (f", job {base['job_id']}" if base["job_id"] else "") + f", rank {env.rank}/{env.world_size}", flush=True)
        alive = None
        if main:
            atomic_write_json(marker, {**base, "state": "RUNNING"})
            alive = _Alive(out_dir / ALIVE_FILE).start()
            _close_previous_attempt(stage_dir, self.task_index)
            _append_attempt(stage_dir, self.task_index, {"event": "start", "job_id": base["job_id"],
                                                         "attempt": base["attempt"], "host": base["host"]})
        try:
            if env.restart_count > self.max_requeues:
                raise RequeueLimitError(
                    f"stage '{self.stage}' was requeued {env.restart_count} times (limit {self.max_requeues}): "
                    f"it keeps being interrupted before it finishes. Read its log ({command()} logs "
                    f"{Path(self.run_dir).name} {self.stage}), fix the cause, then resume the run"
                )
            ctx = StageContext(
                run_dir=Path(self.run_dir),
                stage=self.stage,
                out_dir=out_dir,
                config=self.point_configs[self.task_index] if self.point_configs and self.task_index is not None
                else self.config,
                inputs=self.resolve_inputs(),
                input_kinds={k: v.kind for k, v in self.inputs.items()},
                task_index=self.task_index,
                num_tasks=self.num_tasks,
                data_root=Path(self.data_root),
                env=env,
                extra={"outputs": self.outputs},
            )
            result = self.fn(ctx)
        except BaseException as exc:
            by_submitit = isinstance(exc, SystemExit) and _requeue_cause is not None
            requeued = type(exc).__name__ == "Requeued" or by_submitit
            cause = _requeue_cause if by_submitit else getattr(exc, "cause", None) or ("REQUEUED" if requeued else "FAILED")
            if main:
                if not by_submitit:  # checkpoint() wrote that end already
                    _append_attempt(stage_dir, self.task_index, {
                        "event": "end", "job_id": base["job_id"], "attempt": base["attempt"],
                        "state": "REQUEUED" if requeued else "FAILED", "cause": cause,
                        "step": getattr(exc, "step", None), "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
                atomic_write_json(
                    marker,
                    {
                        **base,
                        "state": "REQUEUED" if requeued else "FAILED",
                        "cause": cause,
                        "ended": _now(),
                        "elapsed_s": round(time.time() - started, 3),
                        "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                        "traceback": traceback.format_exc()[-4000:],
                    },
                )
            if requeued and main and _in_slurm_job():
                # Slurm starts the requeued job only once its processes are gone, and rank 0's
                # checkpoint, marker and attempt log are on disk: end now, not after seconds of
                # interpreter teardown (torch, threads, submitit pickling a result nobody reads).
                # The other ranks end as before (srun's kill-on-bad-exit must not stop rank 0
                # before its records). Measured on the dev cluster: the requeue completes 0.1 s
                # after the signal instead of ~1.8 s.
                _exit_now(REQUEUED_EXIT)
            raise
        finally:
            if alive is not None:
                alive.stop()
        _ignore_requeue_signal()
        shown = result if _jsonable(result) else repr(result)
        print(f"[hpc_jobs] {what} COMPLETED in {time.time() - started:.1f} s"
              + (f": {json.dumps(shown, default=str)[:300]}" if shown is not None else ""), flush=True)
        if main:
            _append_attempt(stage_dir, self.task_index, {"event": "end", "job_id": base["job_id"],
                                                         "attempt": base["attempt"], "state": "COMPLETED"})
            atomic_write_json(
                marker,
                {
                    **base,
                    "state": "COMPLETED",
                    "ended": _now(),
                    "elapsed_s": round(time.time() - started, 3),
                    "result": result if _jsonable(result) else repr(result),
                },
            )
        return result

    # submitit's Checkpointable protocol: on the requeue signal, run the same stage again. Stages
    # are idempotent (finished work is skipped) and training resumes from its last checkpoint.
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        global _requeue_cause
        import submitit

        from .environment import RunEnv

        env = RunEnv.detect()
        _requeue_cause = env.stop_cause() or "REQUEUED"
        try:  # submitit calls this on rank 0 only
            _append_attempt(Path(self.run_dir) / "stages" / self.stage, self.task_index, {
                "event": "end", "job_id": _slurm_job_id(), "attempt": env.restart_count, "state": "REQUEUED",
                "cause": _requeue_cause, "step": None})
        except OSError:
            pass
        return submitit.helpers.DelayedSubmission(self)


def _ignore_requeue_signal() -> None:
    """The stage's work is done: a requeue signal from now on (the time-limit warning reaching a
    job that is exiting) must neither requeue it nor kill it with the default action, which would
    end a completed stage FAILED and cancel its descendants. SIG_IGN survives interpreter exit."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    name = (os.environ.get("HPC_JOBS_SIGNAL") or "USR2").upper().removeprefix("SIG")
    signum = getattr(signal, "SIG" + name, None)
    if signum is not None:
        signal.signal(signum, signal.SIG_IGN)


#: the exit status of a process whose stage was checkpointed and requeued (EX_TEMPFAIL: run me again)
REQUEUED_EXIT = Requeued.exit_code


def _in_slurm_job() -> bool:
    """This process is a stage task that submitit started in a Slurm job (not a test calling the
    runner, not the local backend, whose ``main`` ends the process itself)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _slurm_job_id() -> Optional[str]:
    """``ARRAYJOB_TASK`` for an array task (how the ledger names it), else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _jsonable(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def write_runner(stage_dir: Path, runner: StageRunner) -> Path:
    path = stage_dir / RUNNER_FILE
    atomic_write_bytes(path, pickle.dumps(runner), fsync=False)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m hpc_jobs.runtime RUN_DIR STAGE [--task I]``: run one stage task here."""
    parser = argparse.ArgumentParser(prog="python -m hpc_jobs.runtime", description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    parser.add_argument("--task", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(Path(args.run_dir) / "stages" / args.stage / RUNNER_FILE, "rb") as fh:
        runner: StageRunner = pickle.load(fh)
    try:
        runner.for_task(args.task)()
    except StageInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:
        if type(exc).__name__ == "Requeued":
            return REQUEUED_EXIT
        traceback.print_exc()
        return 1
    return 0


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown once the stage's outcome is on disk (marker
    and checkpoints written atomically, logs flushed). Multi-rank teardown of native libraries
    (gloo/NCCL groups, DeepSpeed's threads) can crash a rank at exit after a stage COMPLETED on
    every rank, and the crash would fail the stage and cancel its descendants."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing left to flush to
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
