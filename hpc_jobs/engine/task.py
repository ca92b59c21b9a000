"""TrainTask: what a workflow implements to train through the engine (no torch import here).

Required: ``build_model``, ``train_dataset``, ``training_step``. Everything else is optional and
detected with ``getattr``; the engine supplies the rest (devices, wrapping, precision, data order,
accumulation, checkpoints, resume, signals, logs).

- ``training_step(model, batch)`` gets the *wrapped* model (DDP or the DeepSpeed engine: call it
  for the forward so gradients synchronise; use ``hpc_jobs.engine.unwrap(model)`` for attributes)
  and a batch already on the device. It returns the loss, or a dict with ``"loss"`` and extra
  scalars to log. It runs under autocast when mixed precision is on; do not call ``backward``.
- ``validate(model, loader)`` gets the *unwrapped* model in eval mode under ``torch.no_grad`` and
  autocast, and a loader yielding device batches. With ``TrainConfig.validate_on="rank0"`` (default)
  it runs on rank 0 only over the whole validation set, so global metrics (Spearman, uAP, mAP) need
  no reduction; the result is broadcast so every rank takes the same best-checkpoint decision.
  With ``validate_on="all"`` every rank sees a shard (DistributedSampler) and the task reduces
  (``hpc_jobs.engine.distributed.all_gather_tensor``); rank 0's result is broadcast.
- ``state_dict()`` / ``load_state_dict(state)``: task state that must survive a resume (a
  cross-batch memory bank, an EMA copy, counters). Saved in every checkpoint.
- ``filter_init_state(state_dict, model)``: adapt foreign weights for ``init_from`` (resize
  position embeddings, drop a head), like timm's ``checkpoint_filter_fn``.
- ``collate_fn``: attribute or method passed to the DataLoaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.utils.data import DataLoader, Dataset


@runtime_checkable
class TrainTask(Protocol):
    def build_model(self) -> "torch.nn.Module":
        """The model on the CPU; the engine moves and wraps it."""

    def train_dataset(self) -> "Dataset":
        """A map-style dataset (len + getitem); the engine shards and orders it."""

    def training_step(self, model: "torch.nn.Module", batch: Any) -> "torch.Tensor | dict[str, Any]":
        """Forward one micro-batch; return the loss or {"loss": loss, **scalars}."""


class OptionalTaskHooks(Protocol):  # documentation of the optional methods (not enforced)
    def build_optimizer(self, model: "torch.nn.Module") -> "torch.optim.Optimizer":
        """Default: AdamW(model.parameters(), lr=TrainConfig.lr). DeepSpeed wraps it as is."""

    def build_scheduler(self, optimizer: "torch.optim.Optimizer", steps_per_epoch: int,
                        epochs: int) -> "torch.optim.lr_scheduler.LRScheduler | None":
        """Stepped once per optimizer step (not per epoch)."""

    def val_dataset(self) -> "Dataset | None": ...

    def validate(self, model: "torch.nn.Module", loader: "DataLoader") -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def filter_init_state(self, state_dict: dict, model: "torch.nn.Module") -> dict: ...
