"""``init_from``: start a model from another run's (or a published) checkpoint, weights only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from hpc_jobs.checkpoint import CheckpointError, load_checkpoint, manifest_path

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_KEYS = ("model", "state_dict", "model_state", "module", "model_state_dict")


class ArchitectureMismatch(CheckpointError):
    """The checkpoint was written for another model."""


@dataclass
class InitReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, ckpt, model shape

    def summary(self) -> str:
        def few(names: list) -> str:
            return ", ".join(map(str, names[:5])) + (" ..." if len(names) > 5 else "")

        parts = [f"init_from {self.path}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept initial values: {few(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored: {few(self.unexpected)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with other shapes (skipped: {few([m[0] for m in self.mismatched])})")
        return "; ".join(parts)


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: engine checkpoints (``model``), common layouts
    (``state_dict``, TimeSformer's ``model_state``, DeepSpeed's ``module``) or a bare state dict."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError("no model weights found in the checkpoint: expected a state dict or a dict "
                          f"with one of the keys {', '.join(STATE_KEYS)}")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_init_weights(model: torch.nn.Module, path: str | Path, *, key_map: Callable[[str], str | None] | Mapping[str, str] | None = None,
                      filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
                      max_mismatch: float = 0.1, min_matched: float = 0.5) -> InitReport:
    """Load weights non-strictly: strip ``module.``/``_orig_mod.`` prefixes, rename keys with
    ``key_map`` (callable returning the new name or None to drop, or a dict), then ``filter_fn``
    (resize embeddings...). Raises ``ArchitectureMismatch`` when more than ``max_mismatch`` of the
    shared tensors disagree in shape or fewer than ``min_matched`` of the model's tensors are found:
    the checkpoint belongs to another architecture."""
    path = Path(path)
    # Engine checkpoints carry a manifest: verify them. Foreign files (.pyth, .pth) have none.
    raw = load_checkpoint(path, verify=manifest_path(path).exists())
    state = strip_prefixes(extract_state_dict(raw))
    if isinstance(key_map, Mapping):  # a dict renames the keys it names and keeps the others
        state = {key_map.get(k, k): v for k, v in state.items()}
    elif key_map is not None:  # a callable returns the new name, or None to drop the tensor
        state = {new: v for k, v in state.items() if (new := key_map(k)) is not None}
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    report = InitReport(path=str(path))
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    shared = [k for k in own if k in state]
    report.mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shared
                         if tuple(state[k].shape) != tuple(own[k].shape)]
    report.loaded = [k for k in shared if tuple(state[k].shape) == tuple(own[k].shape)]
    found = len(shared) / max(1, len(own))
    bad = len(report.mismatched) / max(1, len(shared))
    if not shared or found < min_matched or bad > max_mismatch:
        example = ""
        if report.mismatched:
            name, got, want = report.mismatched[0]
            example = f", e.g. {name!r} is {list(got)} in the checkpoint but {list(want)} in the model"
        elif report.missing:
            example = f", e.g. the model's {report.missing[0]!r} is absent"
        raise ArchitectureMismatch(
            f"{path} does not fit this model: {len(shared)} of {len(own)} model tensors found by name, "
            f"{len(report.mismatched)} of them with other shapes{example}. It was written for another "
            "architecture or configuration: pass a checkpoint of this model, or map its names with "
            "init_key_map / TrainTask.filter_init_state")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
