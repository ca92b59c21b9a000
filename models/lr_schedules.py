"""Learning-rate factors for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per optimizer
step. Objects, not closures, so the scheduler's state (and a resume) keeps them."""

from __future__ import annotations

import math


class EpochLinearDecay:
    """``1 - epoch / epochs`` (the ISC seed's adjust_learning_rate, applied at every epoch start)."""

    def __init__(self, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch, self.epochs = max(1, int(steps_per_epoch)), max(1, int(epochs))

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - (step // self.steps_per_epoch) / self.epochs)


class WarmupCosine:
    """Linear warm-up from 0 over ``warmup_steps``, then a cosine from 1 to 0 at ``total_steps``
    (transformers' get_cosine_schedule_with_warmup, as the VSC seed's ``--warmup_steps``)."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
