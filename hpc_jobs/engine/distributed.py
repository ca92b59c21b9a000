"""Process group, device choice and the few collectives the engine needs.

World size 1 runs the same code without a process group: every collective here degrades to the
identity, so the training loop has no ``if distributed`` branches.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from hpc_jobs.environment import RunEnv


def select_device(env: RunEnv, want: str = "auto") -> torch.device:
    """One process per GPU: ``cuda:local_rank`` when every local rank sees all GPUs, ``cuda:0``
    when Slurm bound one GPU per task; the CPU when no GPU is visible (or ``want="cpu"``)."""
    if want == "cpu" or not torch.cuda.is_available():
        if want == "cuda":
            raise RuntimeError("TrainConfig.device='cuda' but torch sees no GPU "
                               f"(CUDA_VISIBLE_DEVICES={','.join(env.gpus) or 'unset'})")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank < count:
        index = env.local_rank
    elif count == 1:
        index = 0
    else:
        raise RuntimeError(
            f"local rank {env.local_rank} of {env.local_world_size} but only {count} GPUs are visible: "
            "start one process per GPU (e.g. --gpus equal to tasks per node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class Distributed:
    """The process group of one training run (created here unless the caller made one)."""

    def __init__(self, env: RunEnv, device: torch.device, *, force_group: bool = False,
                 timeout_s: float = 1800.0) -> None:
        self.env = env
        self.device = device
        self.owns_group = False
        if (env.world_size > 1 or force_group) and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = timedelta(seconds=timeout_s)
            if env.world_size == 1:  # DeepSpeed wants a group even alone: no port needed
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            else:
                kwargs = {"device_id": device} if device.type == "cuda" else {}
                dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                        rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
            self.owns_group = True
        if dist.is_initialized() and (dist.get_world_size() != env.world_size or dist.get_rank() != env.rank):
            raise RuntimeError(f"process group is rank {dist.get_rank()}/{dist.get_world_size()} but the "
                               f"environment says {env.rank}/{env.world_size}")

    @property
    def active(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self) -> None:
        if self.active:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def max_int(self, values: list[int]) -> list[int]:
        """Element-wise max over ranks (flags every rank must agree on)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of a dict of floats with the same keys on every rank."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank. When it fails,
        rank 0 re-raises and the other ranks raise too, instead of waiting in a collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, after telling the others
                error = exc
        if self.active:
            status = self.broadcast(("ok", result) if error is None else ("error", f"{type(error).__name__}: {error}"))
        else:
            status = ("ok", result)
        if error is not None:
            raise error
        if status[0] == "error":
            raise RuntimeError(f"rank 0 failed: {status[1]}")
        return status[1]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor (same shape except dim 0 allowed to differ) from every rank, for tasks
    that validate on all ranks (``validate_on="all"``)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, tensor.shape[0])
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


# RNG states, stored as tensors and ints so checkpoints load with weights_only=True.
def get_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
