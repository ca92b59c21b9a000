"""isc: exact kNN with faiss (the post-process's searches) against a numpy baseline, and the whole
post-process (DBA + NES + kNN) at a few sizes. 256-d unit descriptors, k=10, this machine's CPU
(faiss-cpu; the same code moves the index to every GPU when faiss-gpu sees one).

Each figure is the median of the repetitions (min and max beside it), the baseline measured in the
same run. ``python -m benchmarks.isc_bench [--quick]`` prints markdown tables; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import summary  # noqa: E402

DIM, K = 256, 10


def _unit(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_knn(database: np.ndarray, queries: np.ndarray, k: int = K, block: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Baseline: squared L2 via one matmul per block of queries, then argpartition + sort."""
    norms = (database ** 2).sum(1)
    dists, inds = [], []
    for lo in range(0, len(queries), block):
        q = queries[lo:lo + block]
        d = norms[None, :] - 2.0 * q @ database.T + (q ** 2).sum(1)[:, None]
        part = np.argpartition(d, k, axis=1)[:, :k]
        rows = np.arange(len(q))[:, None]
        order = np.argsort(d[rows, part], axis=1)
        inds.append(part[rows, order])
        dists.append(d[rows, inds[-1]])
    return np.concatenate(dists), np.concatenate(inds)


def _timed(fn: Callable[[], object], reps: int) -> Dict[str, float]:
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return summary(samples)


def _cell(s: Dict[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def bench_knn(sizes: List[Tuple[int, int]], reps: int) -> List[Tuple[str, Dict[str, float], Dict[str, float]]]:
    """Per size: (what, faiss seconds, numpy seconds), each a summary of ``reps`` interleaved runs."""
    from data.retrieval.knn import knn

    rng = np.random.default_rng(0)
    rows = []
    for n_db, n_q in sizes:
        db, q = _unit(n_db, rng), _unit(n_q, rng)
        ours_s, base_s = [], []
        for _ in range(reps):  # interleaved
            ours_s.append(_timed(lambda: knn(db, q, K, "l2"), 1)["median"])
            base_s.append(_timed(lambda: numpy_knn(db, q), 1)["median"])
        ours, base = summary(ours_s), summary(base_s)
        _, a = knn(db, q, K, "l2")
        _, b = numpy_knn(db, q)
        agree = float(np.mean(a[:, 0] == b[:, 0]))
        rows.append((f"{n_q} queries x {n_db} references (top-1 agreement {agree:.3f})", ours, base))
    return rows


def bench_postprocess(sizes: List[Tuple[int, int, int]], reps: int) -> List[Tuple[str, Dict[str, float]]]:
    from data.isc.postprocess import postprocess

    rng = np.random.default_rng(1)
    rows = []
    for n_train, n_ref, n_q in sizes:
        t, r, q = _unit(n_train, rng), _unit(n_ref, rng), _unit(n_q, rng)
        rows.append((f"{n_q} queries, {n_ref} references, {n_train} training descriptors",
                     _timed(lambda: postprocess(q, r, t), reps)))
    return rows


def table(knn_rows, post_rows) -> str:
    n = knn_rows[0][1]["n"] if knn_rows else 0
    lines = ["### isc: exact kNN, faiss vs numpy (k=10, 256-d, CPU)", "",
             "| search | numpy matmul + argpartition, s (baseline) | faiss, s | n | ratio to baseline |",
             "|---|---|---|---|---|"]
    for name, ours, base in knn_rows:
        lines.append(f"| {name} | {_cell(base, 3)} | {_cell(ours, 3)} | {n} | {ours['median'] / base['median']:.2f}x |")
    lines += ["", "Seconds: median (min-max).", "",
              "### isc: whole post-process (DBA k=10 + NES k=10 + kNN k=10 + plain kNN), faiss on the CPU", "",
              "| size | median s | min | max | n |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {s['n']} |" for name, s in post_rows]
    lines += ["", "No baseline: the seed ran this on GPUs (faiss-gpu); the CPU figures say what a CPU job costs."]
    return "\n".join(lines)


def sizes(quick: bool):
    """(kNN sizes, post-process sizes, repetitions) of a quick or a full run."""
    if quick:
        return [(10_000, 1_000), (50_000, 2_000)], [(5_000, 2_000, 500)], 3
    return ([(10_000, 1_000), (100_000, 5_000), (200_000, 10_000)],
            [(20_000, 10_000, 2_000), (100_000, 50_000, 10_000)], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isc_bench", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    knn_sizes, post_sizes, reps = sizes(args.quick)
    print(table(bench_knn(knn_sizes, reps), bench_postprocess(post_sizes, reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
