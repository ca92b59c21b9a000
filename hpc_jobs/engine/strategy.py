"""How gradients are synchronised and optimizer state is kept: DDP or DeepSpeed ZeRO.

Both expose the same small surface to the training loop: ``setup``, ``boundary`` (entering a
micro-batch), ``backward``, ``step``, checkpoint state in and out.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from hpc_jobs.engine.config import TrainConfig
from hpc_jobs.engine.distributed import Distributed

DS_TAG = "ds"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


class Strategy:
    name = "base"

    def __init__(self, dist: Distributed, config: TrainConfig, precision: str) -> None:
        self.dist, self.config, self.precision = dist, config, precision
        self.device = dist.device
        self.model: torch.nn.Module | None = None   # what training_step calls
        self.module: torch.nn.Module | None = None  # the user's module
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def boundary(self, is_boundary: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, is_boundary: bool) -> None:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def save_shards(self, directory: Path) -> Path | None:
        return None

    def load_checkpoint_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        raise NotImplementedError


class DDPStrategy(Strategy):
    """DistributedDataParallel when world size > 1 (plain module otherwise), torch AMP with a
    GradScaler for fp16, ``no_sync`` on accumulation micro-batches."""

    name = "ddp"

    def setup(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids,
                                                 find_unused_parameters=self.config.find_unused_parameters)
        else:
            self.model = module
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    @contextlib.contextmanager
    def boundary(self, is_boundary: bool) -> Iterator[None]:
        if not is_boundary and isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, is_boundary: bool) -> None:
        if not is_boundary:
            return
        if self.config.grad_clip:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_checkpoint_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(config: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """DeepSpeed config from TrainConfig (``config.deepspeed_config`` merged over it).

    - The task's torch optimizer is passed as is ("zero_allow_untested_optimizer"), so DeepSpeed
      does not compile its fused Adam.
    - Mixed precision uses DeepSpeed's ``torch_autocast`` (fp32 master weights, autocast in the
      forward, a GradScaler inside ZeRO for fp16): the same semantics as the DDP path, so tasks
      never cast their inputs. DeepSpeed's native ``fp16``/``bf16`` modes (half weights) switch
      autocast off inside the engine's forward; choose them through ``deepspeed_config`` only if
      the task feeds half-precision inputs itself.
    """
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.batch_size * config.grad_accum * world_size,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(config.grad_clip or 0.0),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return _merge(generated, config.deepspeed_config)


def _skip_cpu_shm_op_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op
    (``deepspeed_shm_comm``, ~90 s) when its comm backend starts. Gloo does the same job, so mark
    the op unavailable; opt back in with HPC_JOBS_DEEPSPEED_SHM=1."""
    if os.environ.get("HPC_JOBS_DEEPSPEED_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO (stage ``config.zero_stage``). The engine decides accumulation boundaries
    itself (so the last, shorter accumulation of an epoch is exact) and scales the loss itself.
    Optimizer shards are written with DeepSpeed's own ``save_checkpoint`` into ``step-N.ds/``,
    listed in the step checkpoint's manifest as companions."""

    name = "deepspeed"

    def setup(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.device.type == "cpu":
            _skip_cpu_shm_op_build()
        import deepspeed

        env = self.dist.env  # DeepSpeed reads the torchrun variables itself; RunEnv is the authority
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                          LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                          MASTER_PORT=str(env.master_port))

        self.ds_config = deepspeed_config(self.config, self.dist.world_size, self.precision)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config,
                                               dist_init_required=False)
        self.engine = engine
        self.model = engine
        self.module = engine.module
        self.optimizer = optimizer  # the torch optimizer: schedulers keep working on its param_groups

    @contextlib.contextmanager
    def boundary(self, is_boundary: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(is_boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, is_boundary: bool) -> None:
        self.engine.step()  # every micro-batch; DeepSpeed steps the optimizer at the boundary

    def save_shards(self, directory: Path) -> Path:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        return directory

    def load_checkpoint_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        saved_world = state.get("world_size")
        if saved_world != self.dist.world_size:
            raise RuntimeError(
                f"{checkpoint} holds DeepSpeed ZeRO shards of {saved_world} ranks but this run has "
                f"{self.dist.world_size}: resume with the same number of GPUs, or start from its "
                "weights with init_from")
        directory = checkpoint.parent / state["deepspeed_dir"]
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")


def make_strategy(dist: Distributed, config: TrainConfig, precision: str) -> Strategy:
    cls = DeepSpeedStrategy if config.strategy == "deepspeed" else DDPStrategy
    return cls(dist, config, precision)
