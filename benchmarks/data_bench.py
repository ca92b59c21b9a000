"""Diving data benchmarks, each against its baseline in the same run:

- frame extraction: ours (OpenCV, annotated ranges only, parallel) against the seed's method
  (ffmpeg decodes every frame, then the unannotated ones are deleted), same videos;
- the data loader's clips/s against the tiny model's training step rate (clips/s it consumes).

Run: ``python -m benchmarks.data_bench [--reps N] [--preset sparse]``. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

_summary = common.summary


def bench_extraction(root: Path, reps: int) -> Dict[str, Dict[str, float]]:
    from data.diving import extract_frames, extract_with_ffmpeg_baseline

    ours, base = [], []
    for _ in range(reps):
        for target, fn, out in (("ours", extract_frames, ours), ("ffmpeg", extract_with_ffmpeg_baseline, base)):
            frames = root / f"frames-{target}"
            shutil.rmtree(frames, ignore_errors=True)
            t0 = time.perf_counter()
            fn(root, frames_dir=frames, log=None)
            out.append(time.perf_counter() - t0)
    return {"seed method: ffmpeg all frames, delete unannotated (baseline)": _summary(base),
            "hpc-jobs: OpenCV, annotated ranges, parallel": _summary(ours)}


def bench_loader_vs_model(root: Path, reps: int, batches: int = 20) -> Dict[str, Dict[str, float]]:
    import torch

    from launchers.diving import PRESETS, DivingConfig, DivingTask
    from hpc_jobs import config as cfgmod

    torch.set_num_threads(1)
    shutil.rmtree(root / "whole_videos_frames", ignore_errors=True)
    from data.diving import extract_frames

    extract_frames(root, log=None)
    cfg = cfgmod.apply(DivingConfig(), cfgmod.flatten_mapping(PRESETS["tiny"]))
    task = DivingTask(cfg, root)
    ds = task.splits().train
    model, bs = task.build_model(), cfg.batch_size
    opt = task.build_optimizer(model)
    loader_rates, model_rates = [], []
    for _ in range(reps):
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0)
        t0, n, cached = time.perf_counter(), 0, []
        for i, batch in enumerate(loader):
            n += len(batch[0])
            cached.append(batch)
            if i + 1 >= batches:
                break
        loader_rates.append(n / (time.perf_counter() - t0))
        t0, n = time.perf_counter(), 0
        for batch in cached:
            loss = task.training_step(model, batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(batch[0])
        model_rates.append(n / (time.perf_counter() - t0))
    # rates, not times: report seconds per clip so the table's ratios read as "x slower than baseline"
    return {"tiny TimeSformer training step, s/clip (baseline)": _summary([1 / r for r in model_rates]),
            "data loader (1 process), s/clip": _summary([1 / r for r in loader_rates])}


def table(title: str, results: Dict[str, Dict[str, float]]) -> str:
    return common.table(title, results, digits=4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--preset", default="sparse", help="synthetic set: sparse has the real set's ~10%% annotated share")
    args = p.parse_args(argv)
    if not shutil.which("ffmpeg"):
        print("ffmpeg is not installed (apt-get install ffmpeg): the extraction baseline needs it", file=sys.stderr)
        return 2
    from data.diving import synthetic

    work = Path(tempfile.mkdtemp(prefix="hpcjobs-databench-"))
    try:
        root = work / "mtl"
        synthetic.generate(root, preset=args.preset)
        print(table(f"data: frame extraction, synthetic '{args.preset}' set", bench_extraction(root, args.reps)))
        print()
        print(table("data: loader vs model (tiny preset, 64 px, 8 frames)", bench_loader_vs_model(root, args.reps)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
