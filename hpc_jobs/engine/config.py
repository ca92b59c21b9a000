"""TrainConfig: the engine's knobs as plain data (no torch import, so launchers can validate it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "deepspeed")
VALIDATE_ON = ("rank0", "all")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 8                 # per rank, per micro-batch
    lr: float = 1e-3                    # for tasks that build their optimizer from it
    grad_accum: int = 1                 # micro-batches per optimizer step
    precision: str = "auto"             # auto: bf16 on GPUs that support it, else fp16 on GPUs; fp32 on CPU
    strategy: str = "ddp"               # "ddp" | "deepspeed" (ZeRO, `zero_stage`)
    zero_stage: int = 2
    deepspeed_config: dict = field(default_factory=dict)  # merged over the generated config
    num_workers: int | None = None      # None: min(8, cpus_per_task - 1)
    seed: int = 0
    checkpoint_every_steps: int = 0     # 0: only at epoch ends and on the requeue signal
    keep_last: int = 2                  # complete step checkpoints kept (best.pt/last.pt always kept)
    best_metric: str | None = None      # validation metric that selects best.pt
    best_mode: str = "max"              # "max" | "min"
    log_every: int = 10                 # optimizer steps between progress lines / metrics rows
    max_steps: int | None = None        # stop after this many optimizer steps in total (tests, smoke runs)
    signal_name: str = "USR2"           # the requeue signal (Slurm --signal); SIGTERM is always handled
    deterministic: bool = False         # torch.use_deterministic_algorithms + no cudnn benchmark
    grad_clip: float | None = None      # max gradient norm
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    drop_last: bool = True              # drop the last incomplete training batch of each rank
    seed_samples: bool = True           # RNG inside Dataset.__getitem__ = f(seed, epoch, index)
    validate_on: str = "rank0"          # "rank0": full val set on rank 0 | "all": sharded, task reduces
    validate_every_epochs: int = 1
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    num_threads: int | None = None      # torch intra-op threads; None: cpus_per_task under Slurm
    heartbeat_every_s: float = 5.0
    tensorboard: bool = True            # events in out_dir/tb (metrics.csv is always written)
    plot: bool = True                   # out_dir/losses.png refreshed at epoch ends (matplotlib)
    dist_timeout_s: float = 1800.0      # collectives (validation on rank 0 holds the others)
    init_max_mismatch: float = 0.1      # init_from: max fraction of shared tensors with other shapes
    init_min_matched: float = 0.5       # init_from: min fraction of model tensors found
    requeue: bool = True                # on the requeue signal under Slurm, call scontrol requeue

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {rule}")

        if self.precision not in PRECISIONS:
            raise bad("precision", f"expected one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"expected one of {', '.join(STRATEGIES)}")
        if self.validate_on not in VALIDATE_ON:
            raise bad("validate_on", f"expected one of {', '.join(VALIDATE_ON)}")
        if self.best_mode not in ("max", "min"):
            raise bad("best_mode", "expected 'max' or 'min'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "expected 'auto', 'cpu' or 'cuda'")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "keep_last", "validate_every_epochs"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1")
        if self.checkpoint_every_steps < 0:
            raise bad("checkpoint_every_steps", "must be >= 0 (0 = epoch ends and signals only)")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "must be at least 1, or None for no limit")
        if self.zero_stage not in (0, 1, 2):
            raise bad("zero_stage", "expected 0, 1 or 2 (stage 3 partitions the weights, which the "
                      "engine's full-weight checkpoints do not gather)")
        if not 0 <= self.init_max_mismatch <= 1 or not 0 <= self.init_min_matched <= 1:
            raise ValueError("TrainConfig.init_max_mismatch and init_min_matched are fractions in [0, 1]")
        self.signal_name = self.signal_name.upper().removeprefix("SIG")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping, naming unknown keys instead of ignoring them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def resolve_precision(precision: str, device_type: str, bf16_supported: bool) -> str:
    """The precision actually used: "auto" picks bf16 on GPUs that support it, fp16 on older GPUs
    (V100), fp32 on the CPU. fp16 on the CPU is refused (no loss-scaling path there)."""
    if precision == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision='fp16' needs a GPU; use 'bf16' or 'fp32' on the CPU")
    if precision == "bf16" and device_type == "cuda" and not bf16_supported:
        raise ValueError("precision='bf16' is not supported by this GPU; use 'fp16' or 'auto'")
    return precision
