"""Training throughput of the tiny presets on the CPU: the shared engine against a bare torch loop.

For each workflow one batch of its synthetic data is loaded once, then trained on by

- the baseline: a hand-written loop -- the task's ``training_step`` (forward + loss),
  ``zero_grad``, ``backward``, ``optimizer.step()`` -- over that one collated batch;
- hpc-jobs: ``Trainer(task, <the workflow's engine config>).fit()`` over an in-memory dataset of
  that batch's samples, so every step also goes through the engine's loader (sampler, per-sample
  seeding, collation), logging, metrics file, heartbeat and signal check; and the same with
  ``seed_samples=False``, which shows what the per-sample RNG seeding costs (the engine's default:
  every sample's random draws are a function of seed, epoch and index, so a resumed run draws the
  same augmentations).

Both build the model and the optimizer through the workflow's task object (same seed), run with
one torch thread and no loader workers, warm up for a few steps, then time a fixed number of
steps; a run's rate is one over its median step time (step start to the next step's start), so
the ratio is the engine's per-step overhead and one step stalled by another process counts little. Model set-up and the final checkpoint are outside
the window.

- diving: TimeSformer, ``launchers/diving.py`` preset ``tiny`` (2 blocks, 96-d, 8 frames of 64 px,
  batch 4), synthetic MTL-AQA (``data/diving/synthetic.py``, preset ``tiny``);
- isc: stage ``train_v83`` of ``launchers/isc.py`` preset ``tiny`` (MobileNetV3-small-050 + GeM,
  64 px, batch 32 x 2 views, memory-bank contrastive loss), synthetic DISC21
  (``data/isc/synthetic.py``, preset ``micro``: only 32 training images are read).

Run: ``python -m benchmarks.train_bench [--reps N] [--steps N]``. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import summary, table  # noqa: E402

THREADS = 1
BARE = "bare torch loop: training_step + backward + optimizer step (baseline)"
ENGINE = "hpc-jobs engine: Trainer.fit() (loader, per-sample seeding, logging, heartbeat, signal checks)"
UNSEEDED = "hpc-jobs engine, `seed_samples=False` (sample RNG no longer a function of seed, epoch, index)"


class _InMemory:
    """A map-style dataset of ``length`` items cycling through the cached ``samples``."""

    def __init__(self, samples: List[Any], length: int) -> None:
        self.samples, self.length = samples, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.samples[int(index) % len(self.samples)]


class _Timed:
    """The workflow's task with the cached samples as its training set; notes when each step starts."""

    def __init__(self, task: Any, samples: List[Any], length: int, stamps: List[float]) -> None:
        self.task, self.samples, self.length, self.stamps = task, samples, length, stamps

    def build_model(self):
        return self.task.build_model()

    def build_optimizer(self, model):
        return self.task.build_optimizer(model)

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        fn = getattr(self.task, "build_scheduler", None)
        return fn(optimizer, steps_per_epoch, epochs) if fn else None

    def train_dataset(self):
        return _InMemory(self.samples, self.length)

    def training_step(self, model, batch):
        self.stamps.append(time.perf_counter())
        return self.task.training_step(model, batch)

    def state_dict(self) -> dict:
        fn = getattr(self.task, "state_dict", None)
        return fn() if fn else {}

    def load_state_dict(self, state: dict) -> None:
        fn = getattr(self.task, "load_state_dict", None)
        if fn:
            fn(state)


def _rate(stamps: List[float], warmup: int, steps: int) -> float:
    """Steps/s from the median step time of the timed window: one step stalled by another process
    on a shared machine moves a mean a lot and a median little."""
    import statistics

    gaps = [b - a for a, b in zip(stamps[warmup:warmup + steps], stamps[warmup + 1:warmup + steps + 1])]
    return 1.0 / statistics.median(gaps)


def bare_loop(make_task: Callable[[], Any], samples: List[Any], seed: int, warmup: int, steps: int) -> float:
    """Steps/s of a hand-written loop over one collated batch."""
    import torch
    from torch.utils.data import default_collate

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    task = make_task()
    model = task.build_model()
    opt = task.build_optimizer(model)
    model.train()
    batch = default_collate(samples)
    stamps: List[float] = []
    for _ in range(warmup + steps + 1):
        stamps.append(time.perf_counter())
        out = task.training_step(model, batch)
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _rate(stamps, warmup, steps)


def engine_loop(make_task: Callable[[], Any], samples: List[Any], engine_cfg: Any, warmup: int, steps: int,
                out_dir: Path, **changes: Any) -> float:
    """Steps/s of ``Trainer.fit()`` over the same samples (one epoch of exactly the timed steps);
    ``changes``: TrainConfig fields to set on top of the workflow's."""
    from hpc_jobs.engine import Trainer

    total = warmup + steps + 1
    cfg = dataclasses.replace(engine_cfg, epochs=1, max_steps=total, num_workers=0, num_threads=THREADS,
                              device="cpu", precision="fp32", checkpoint_every_steps=0, **changes)
    stamps: List[float] = []
    task = _Timed(make_task(), samples, total * cfg.batch_size, stamps)
    shutil.rmtree(out_dir, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the engine's progress lines
        Trainer(task, cfg, out_dir).fit()
    return _rate(stamps, warmup, steps)


# -- the two workflows ------------------------------------------------------------------------------
def diving_setup(work: Path) -> Tuple[Callable[[], Any], List[Any], Any, int]:
    from data.diving import extract_frames, synthetic
    from launchers.diving import Diving, DivingTask, _engine_config

    root = work / "diving"
    synthetic.generate(root, preset="tiny")
    extract_frames(root, log=None)
    cfg = Diving.make_config(preset="tiny", overrides={"root_dir": str(root), "gpu": False})
    probe = DivingTask(cfg, root)
    train = probe.train_dataset()
    samples = [train[i] for i in range(cfg.batch_size)]
    return (lambda: DivingTask(cfg, root)), samples, _engine_config(cfg), cfg.seed


def isc_setup(work: Path) -> Tuple[Callable[[], Any], List[Any], Any, int]:
    from data.isc import synthetic
    from data.isc.layout import Disc21
    from launchers.isc import Isc, IscTask, engine_config, stage_epochs

    root = work / "isc"
    synthetic.generate(root, preset="micro", seed=0)
    cfg = Isc.make_config(preset="tiny")
    stage = "train_v83"
    layout = Disc21(root)
    probe = IscTask(cfg, stage, layout)
    train = probe.train_dataset()
    bs = engine_config(cfg, stage, stage_epochs(cfg, stage), 1).batch_size
    samples = [train[i] for i in range(bs)]
    return (lambda: IscTask(cfg, stage, layout)), samples, engine_config(cfg, stage, stage_epochs(cfg, stage), 1), \
        getattr(cfg, stage).seed


#: title -> (set-up, timed steps per ``--steps``: diving's steps are 5x shorter than isc's)
WORKFLOWS = {
    "diving (TimeSformer tiny, 8x64 px, batch 4)": (diving_setup, 4),
    "isc (train_v83 tiny: MobileNetV3-small-050, 64 px, batch 32x2 views)": (isc_setup, 1),
}


def bench_training(reps: int, warmup: int, steps: int, work: Path) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per workflow (title with its timed steps): {row: steps/s summary}, rows BARE (baseline),
    ENGINE, UNSEEDED."""
    import torch

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    threads = torch.get_num_threads()
    try:
        for title, (setup, scale) in WORKFLOWS.items():
            make_task, samples, engine_cfg, seed = setup(work)
            n = steps * scale
            runs: Dict[str, Callable[[], float]] = {
                BARE: lambda: bare_loop(make_task, samples, seed, warmup, n),
                ENGINE: lambda: engine_loop(make_task, samples, engine_cfg, warmup, n, work / "engine-out"),
                UNSEEDED: lambda: engine_loop(make_task, samples, engine_cfg, warmup, n, work / "engine-out",
                                              seed_samples=False),
            }
            rates: Dict[str, List[float]] = {name: [] for name in runs}
            order = list(runs)
            for rep in range(reps):  # interleaved, the order rotated: load on the machine hits all alike
                for name in order[rep % 3:] + order[:rep % 3]:
                    rates[name].append(runs[name]())
            out[f"{title}, {n} steps timed"] = {name: summary(r) for name, r in rates.items()}
    finally:
        torch.set_num_threads(threads)
    return out


def tables(results: Dict[str, Dict[str, Dict[str, float]]], warmup: int) -> str:
    parts = []
    for title, rows in results.items():
        b, e, u = rows[BARE]["median"], rows[ENGINE]["median"], rows[UNSEEDED]["median"]
        note = (f"Timed after {warmup} warm-up steps, {THREADS} torch thread, CPU, fp32. Engine "
                f"overhead per step (difference of the medians): {(1 / e - 1 / b) * 1000:+.1f} ms, of which "
                f"per-sample seeding {(1 / e - 1 / u) * 1000:+.1f} ms.")
        parts.append(table(f"training: {title}", rows, unit="steps/s", digits=2,
                           ratio="ratio to baseline (steps/s; < 1: slower)", notes=[note]))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="timed steps (isc; diving times 4x as many)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hpcjobs-trainbench-", dir="/tmp"))
    try:
        print(tables(bench_training(args.reps, args.warmup, args.steps, work), args.warmup))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
