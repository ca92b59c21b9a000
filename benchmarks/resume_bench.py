"""Resume after a requeue signal on the dev cluster: the seconds from ``scancel --signal=USR2`` to
the first training step of the restarted job, hpc-jobs against plain submitit.

- hpc-jobs: the test-only engine workflow ``faultlab`` (tests/workflows/faultlab.py, made visible
  with ``HPC_JOBS_LAUNCHERS=tests.workflows``; ``prepare -> train``: a small MLP through
  ``hpc_jobs.engine.Trainer``, 120 steps of 0.08 s). On USR2 the engine finishes the step, writes a
  checkpoint (file + manifest, atomically), calls ``scontrol requeue``; the next start resumes from
  that checkpoint. faultlab notes when each process trains its first step (``trail.jsonl``).
- plain submitit (baseline): a ``submitit.helpers.Checkpointable`` job training the same MLP on the
  same data with a hand-written loop (the same 0.08 s per step); on USR2 submitit's handler pickles
  the callable (model and optimizer in it) and calls ``scontrol requeue``.

Both run the same way Slurm sends the signal before a time limit or a preemption (to the job's
steps, ``scancel --signal=USR2 <job>``), about 1 s after training started; the job is cancelled as
soon as the restarted process has trained its first step. Both include Slurm's requeue delay
(the dev cluster holds a requeued job ~5 s before it may start), the job's start-up and the
resume itself. Repetitions are interleaved. Nothing asserts a time.

The figure ends when the restarted process's first optimizer step is done (its weights moved on),
the same point of the same work in both. Where that step begins is shown beside it, but is not
comparable: torch imports ``torch._dynamo`` (~1.2 s here) at an optimizer's first use, which
hpc-jobs' engine meets when it builds the optimizer, before its first step begins, and submitit's
unpickled optimizer inside its first step.

Run: ``python -m benchmarks.resume_bench [--reps N]``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, scancel, slurm_main, summary, table  # noqa: E402

STEP_SLEEP_S = 0.08
SIGNAL_AFTER_S = 1.0  # after the first training step
WAIT_S = 180.0
BASELINE = "plain submitit Checkpointable: pickle the callable, scontrol requeue (baseline)"
OURS = "hpc-jobs engine (faultlab): checkpoint at the step boundary, scontrol requeue, resume"


def _append(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), **record}) + "\n")


def _events(path: Path, event: str) -> List[Dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if row.get("event") == event:
            rows.append(row)
    return rows


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def usr2(job_id: str) -> float:
    """What Slurm sends before a time limit or a preemption, sent now to the job's steps."""
    sent = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True, timeout=60)
    return sent


#: the phases between the signal and the first step, each measured from the signal (report notes)
PHASES = ("the old process stopped (checkpoint written; hpc-jobs' trail only)",
          "the new process's job start (Slurm's StartTime, whole seconds)",
          "the new process entering the stage (its trail's start line)",
          "its first training step begins",
          "its first training step done (the optimizer updated the weights)")


def _recover(trail: Path, job_id: str, phases: Optional[Dict[str, List[float]]] = None) -> float:
    """Signal the job ~1 s into training; seconds until the restarted process has trained its first
    step (the optimizer step done). ``phases``: where the seconds went (:data:`PHASES`), appended to."""
    _wait(lambda: _events(trail, "first_step"), WAIT_S, f"job {job_id} to train")
    time.sleep(SIGNAL_AFTER_S)
    sent = usr2(job_id)
    dones = _wait(lambda: [r for r in _events(trail, "first_step_done") if r["time"] > sent], WAIT_S,
                  f"job {job_id} to train a step again after the requeue")
    if phases is not None:
        rows = _all(trail)
        end = dones[0]["time"]
        old = [r["time"] for r in rows if r.get("event") == "stop" and sent < r["time"] <= end]
        starts = [r["time"] for r in rows if r.get("event") == "start" and r["time"] > sent]
        firsts = [r["time"] for r in rows if r.get("event") == "first_step" and r["time"] > sent]
        began = _start_time(job_id)
        for name, value in zip(PHASES, (max(old) if old else None, began, starts[0] if starts else None,
                                        firsts[0] if firsts else None, end)):
            if value is not None:
                phases.setdefault(name, []).append(value - sent)
    return dones[0]["time"] - sent


def _all(path: Path) -> List[Dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _start_time(job_id: str) -> Optional[float]:
    """The job's current StartTime (after a requeue: the new start), epoch seconds."""
    import datetime as _dt

    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("StartTime="):
            try:
                return _dt.datetime.fromisoformat(word.split("=", 1)[1]).timestamp()
            except ValueError:
                return None
    return None


# -- the baseline: a plain submitit Checkpointable job -----------------------------------------------
def _checkpointable_base():
    import submitit

    return submitit.helpers.Checkpointable


class PlainTrainer(_checkpointable_base()):
    """faultlab's regression (192 samples, 6 features, MLP 6-16-1, batch 8, 5 epochs, AdamW 0.01),
    written as a plain submitit user would: the state lives in the callable, which submitit's
    default ``checkpoint()`` pickles on the requeue signal."""

    samples, features, hidden, batch_size, epochs, lr, seed = 192, 6, 16, 8, 5, 0.01, 0

    def __init__(self, trail: str, step_sleep_s: float = STEP_SLEEP_S) -> None:
        self.trail, self.step_sleep_s = trail, step_sleep_s
        self.model = self.optimizer = None
        self.step = 0

    def _data(self):
        import torch

        rng = random.Random(self.seed)
        w = [rng.uniform(-1, 1) for _ in range(self.features)]
        xs = [[rng.gauss(0, 1) for _ in range(self.features)] for _ in range(self.samples)]
        ys = [sum(a * b for a, b in zip(w, x)) + rng.gauss(0, 0.05) for x in xs]
        return torch.tensor(xs), torch.tensor(ys).unsqueeze(1)

    def __call__(self) -> int:
        import torch
        import torch.nn.functional as F
        from torch import nn

        torch.set_num_threads(1)
        trail = Path(self.trail)
        _append(trail, {"event": "start", "pid": os.getpid(), "from_step": self.step})
        if self.model is None:
            torch.manual_seed(self.seed)
            self.model = nn.Sequential(nn.Linear(self.features, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        x, y = self._data()
        per_epoch = self.samples // self.batch_size
        first, done = True, False
        while self.step < per_epoch * self.epochs:
            epoch, k = divmod(self.step, per_epoch)
            order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            if first:
                _append(trail, {"event": "first_step", "pid": os.getpid(), "step": self.step})
                first = False
            time.sleep(self.step_sleep_s)
            loss = F.mse_loss(self.model(x[idx]), y[idx])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if not done:
                _append(trail, {"event": "first_step_done", "pid": os.getpid(), "step": self.step})
                done = True
        _append(trail, {"event": "done", "step": self.step})
        return self.step


def plain_submitit_once(work: Path, rep: int, phases=None) -> float:
    import submitit

    trail = work / f"submitit-{rep}.jsonl"
    ex = submitit.AutoExecutor(folder=work / "submitit", cluster="slurm")
    ex.update_parameters(timeout_min=10, slurm_partition="batch", cpus_per_task=1, slurm_mem="1G",
                         slurm_job_name="bench-resume", slurm_setup=[f"export PYTHONPATH={REPO}:${{PYTHONPATH:-}}"],
                         slurm_additional_parameters={"chdir": str(REPO)})
    job = ex.submit(PlainTrainer(str(trail)))
    try:
        return _recover(trail, job.job_id, phases)
    finally:
        scancel([job.job_id])


# -- hpc-jobs: the faultlab workflow -----------------------------------------------------------------
def hpc_jobs_once(work: Path, rep: int, phases=None) -> float:
    env = dict(os.environ, HPC_JOBS_HOME=str(work / "home"), HPC_JOBS_LAUNCHERS="tests.workflows",
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "launch.py", "faultlab", "--cluster", "devcluster", "--run-name",
                           f"resume-{rep}", "--set", f"step_sleep_s={STEP_SLEEP_S}", "--set", "downstream=false",
                           "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.py faultlab exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    run_dir = Path(json.loads(proc.stdout)["run_dir"])
    from hpc_jobs.ledger import Run

    run = Run(run_dir)
    ids = [i for rec in run.in_order() for i in rec.job_ids()]
    train = run.stage("train").job_ids()[0]
    try:
        return _recover(run_dir / "stages" / "train" / "trail.jsonl", train, phases)
    finally:
        scancel(ids)


def bench_resume(reps: int, work: Path) -> Dict[str, Any]:
    """``{"results": {row: summary}, "failures": [...]}``."""
    samples: Dict[str, List[float]] = {BASELINE: [], OURS: []}
    phases: Dict[str, Dict[str, List[float]]] = {BASELINE: {}, OURS: {}}
    failures: List[str] = []
    for rep in range(reps):  # interleaved
        for name, fn in ((BASELINE, plain_submitit_once), (OURS, hpc_jobs_once)):
            try:
                samples[name].append(fn(work, rep, phases[name]))
            except Exception as exc:  # one failed repetition must not lose the others
                failures.append(f"{name.split(':')[0]}, repetition {rep + 1}: {exc}")
    return {"results": {k: summary(v) for k, v in samples.items() if v}, "failures": failures, "phases": phases}


def phase_lines(phases: Dict[str, Dict[str, List[float]]]) -> List[str]:
    """Where the seconds went, per tool: the median second after the signal at which each phase ended."""
    import statistics

    out = []
    for name, label in ((BASELINE, "plain submitit"), (OURS, "hpc-jobs")):
        got = phases.get(name) or {}
        parts = [f"{what}: {statistics.median(v):.1f} s" for what, v in ((p, got.get(p)) for p in PHASES) if v]
        if parts:
            out.append(f"- {label}, seconds after the signal (medians): " + "; ".join(parts) + ".")
    return out


def report(reps: int, work: Path, note: Optional[str] = None) -> str:
    out = bench_resume(reps, work)
    notes = [f"Signal ~{SIGNAL_AFTER_S:.0f} s after the first training step (steps of {STEP_SLEEP_S} s); both "
             "include Slurm's requeue delay (the dev cluster makes a requeued job eligible ~5 s after its old "
             "processes are gone), the job's start-up, importing torch and the resume itself. The figure ends when "
             "the restarted process's first optimizer step is done: the same point of the same work in both (where "
             "that step begins is not: torch imports `torch._dynamo`, ~1.2 s here, at an optimizer's first use, "
             "which hpc-jobs' engine meets building its optimizer before its first step and submitit's unpickled "
             "optimizer inside its first step)."]
    if note:
        notes.append(note)
    res = out["results"]
    if BASELINE in res and OURS in res:
        ratio = res[OURS]["median"] / res[BASELINE]["median"]
        notes.append(f"hpc-jobs / plain submitit: {ratio:.2f}x (goal: at or below 1.0: "
                     f"{'reached' if ratio <= 1.0 else 'NOT reached'}).")
    where = phase_lines(out.get("phases") or {})
    if where:
        notes += ["", "Where the time goes:", ""] + where + [
            "", "Both wait for Slurm to requeue the job, which it does once the old job's processes are gone, to hold "
            "it (~5 s) and restart it, and for a new process to start. hpc-jobs' process ends as soon as its "
            "checkpoint, marker and attempt log are on disk (no interpreter teardown), so Slurm requeues the job "
            "~0.1 s after the signal; submitit's process tears down torch and its threads first, and its new job "
            "starts that much later (the job starts above). submitit's callable carries torch objects, so "
            "unpickling it imports torch before its trail's start line, and its state is in memory from then on; "
            "hpc-jobs' stage imports torch and the workflow's model code after it starts, then builds the model, "
            "the optimizer (importing `torch._dynamo`) and the data and loads the checkpoint before its first step."]
    notes += [f"Failed: {f}" for f in out["failures"]]
    title = "resume: seconds from the requeue signal (USR2) to the first training step done after the restart"
    if BASELINE not in out["results"]:
        return "\n".join([f"### {title}", "", "No baseline figure (every repetition failed)."] + notes)
    return table(title, out["results"], BASELINE, digits=1, notes=notes)


def main(argv=None) -> int:
    return slurm_main("python -m benchmarks.resume_bench", __doc__, report, reps=3, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
