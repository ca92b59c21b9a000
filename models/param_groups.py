"""Optimizer parameter groups of the metric-learning seeds: no weight decay on biases, norms and
other 1-d tensors; the projection head optionally at a larger learning rate and weight decay
(VSC: head lr x5, wd x10)."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn


def optimizer_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                     head_prefixes: Sequence[str] = (), head_lr_scale: float = 1.0,
                     head_wd_scale: float = 1.0) -> list:
    """Parameter groups: [no decay, decay] for the body, then the same two for the head (the
    parameters whose names start with one of ``head_prefixes``) when there is one. With ``lr``
    every group names its own learning rate (the head's ``lr * head_lr_scale``)."""
    groups = {(head, decays): [] for head in (False, True) for decays in (False, True)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = any(name.startswith(p) for p in head_prefixes)
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "gain" in name
        groups[(head, not no_decay)].append(param)
    out = []
    for (head, decays), params in groups.items():
        if head and not params:
            continue
        group = {"params": params, "weight_decay": (weight_decay * (head_wd_scale if head else 1.0)) if decays else 0.0}
        if lr is not None:
            group["lr"] = lr * (head_lr_scale if head else 1.0)
        out.append(group)
    return out
