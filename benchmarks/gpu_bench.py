"""GPU figures, measured when this machine has a CUDA GPU:

- TimeSformer training throughput (clips/s, forward + backward + AdamW step) with bf16 autocast
  and ``scaled_dot_product_attention`` (flash / memory-efficient kernels) against the baseline
  the original code ran: fp32 with attention written out (``softmax(q k^T) v``);
- exact kNN of the isc post-process: faiss on every GPU (faiss-gpu) against faiss on the CPU.

Without a GPU the section says so and measures nothing (``--cpu-smoke`` runs the TimeSformer
comparison with a tiny model on the CPU, to check the code path; its figures mean nothing).

``python -m benchmarks.gpu_bench [--quick] [--cpu-smoke]``. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Summary, summary, table  # noqa: E402

#: TimeSformer-Base (K400, 8x224) as the diving paper preset trains it, and a tiny one for --cpu-smoke
BASE = dict(img_size=224, embed_dim=768, depth=12, num_heads=12, num_frames=8, batch=4)
TINY = dict(img_size=32, embed_dim=64, depth=2, num_heads=4, num_frames=4, batch=2)
BASELINE = "fp32, explicit attention (baseline)"


def bench_timesformer(device: str, shape: Dict[str, int], steps: int, warmup: int, reps: int) -> Dict[str, Summary]:
    """clips/s of training steps, for each (precision, attention) variant; same model and batch."""
    import torch

    from models.timesformer import TimeSformer

    variants = [(BASELINE, torch.float32, "explicit"), ("bf16 autocast, SDPA", torch.bfloat16, "sdpa")]
    out: Dict[str, List[float]] = {name: [] for name, *_ in variants}
    batch = shape["batch"]
    x = torch.randn(batch, 3, shape["num_frames"], shape["img_size"], shape["img_size"], device=device)
    y = torch.randn(batch, device=device)
    for _ in range(reps):
        for name, dtype, impl in variants:  # interleaved: drift of the machine hits both alike
            torch.manual_seed(0)
            model = TimeSformer(img_size=shape["img_size"], embed_dim=shape["embed_dim"], depth=shape["depth"],
                                num_heads=shape["num_heads"], num_frames=shape["num_frames"], num_classes=1,
                                attn_impl=impl, drop_path_rate=0.0).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for _ in range(warmup):
                _train_step(model, opt, x, y, device, dtype)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                _train_step(model, opt, x, y, device, dtype)
            _sync(device)
            out[name].append(steps * batch / (time.perf_counter() - t0))
    return {name: summary(v) for name, v in out.items()}


def _train_step(model, opt, x, y, device: str, dtype) -> None:
    import torch

    with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        loss = torch.nn.functional.mse_loss(model(x).float().squeeze(-1), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_faiss_gpu(n_query: int, n_db: int, reps: int, k: int = 10, dim: int = 256) -> Optional[Dict[str, Summary]]:
    """Seconds of an exact inner-product kNN: faiss CPU (baseline) vs the same index on all GPUs."""
    import faiss
    import numpy as np

    if faiss.get_num_gpus() == 0:
        return None
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n_db, dim)).astype(np.float32)
    q = rng.standard_normal((n_query, dim)).astype(np.float32)
    faiss.normalize_L2(db)
    faiss.normalize_L2(q)
    out: Dict[str, List[float]] = {"faiss CPU, IndexFlatIP (baseline)": [], f"faiss on {faiss.get_num_gpus()} GPU(s)": []}
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(db)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    gpu.search(q[:10], k)  # warm-up: kernels, memory pools
    for _ in range(reps):
        for (name, index) in zip(out, (cpu, gpu)):
            t0 = time.perf_counter()
            index.search(q, k)
            out[name].append(time.perf_counter() - t0)
    return {name: summary(v) for name, v in out.items()}


def report(quick: bool, cpu_smoke: bool = False) -> str:
    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not cpu_smoke:
        return ("Not measured: no CUDA GPU on this machine. On a GPU machine this section compares "
                "TimeSformer training clips/s (bf16 + SDPA against fp32 with explicit attention) and faiss "
                "kNN on the GPUs against the CPU.")
    device, shape = ("cuda", BASE) if has_gpu else ("cpu", TINY)
    steps, warmup, reps = (10, 3, 3) if quick else (30, 5, 5)
    if cpu_smoke and not has_gpu:
        steps, warmup, reps = 2, 1, 1
    name = torch.cuda.get_device_name(0) if has_gpu else "CPU (smoke test: figures mean nothing)"
    parts = [table(f"TimeSformer training, {shape['depth']} blocks x {shape['embed_dim']}-d, {shape['num_frames']}x"
                   f"{shape['img_size']} px, batch {shape['batch']}, on {name}",
                   bench_timesformer(device, shape, steps, warmup, reps), BASELINE, unit="clips/s", digits=2,
                   ratio="speed-up over the baseline")]
    faiss_rows = bench_faiss_gpu(*((10_000, 100_000) if quick else (50_000, 1_000_000)), reps=3) if has_gpu else None
    if faiss_rows:
        parts.append(table("isc kNN: faiss on the GPUs vs the CPU (k=10, 256-d)", faiss_rows))
    elif has_gpu:
        parts.append("faiss kNN on GPU: not measured (this faiss has no GPU support: install faiss-gpu).")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the TimeSformer comparison tiny on the CPU")
    args = p.parse_args(argv)
    print(report(args.quick, args.cpu_smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
