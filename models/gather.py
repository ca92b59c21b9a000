"""All-gather with gradient: every rank's descriptors in one batch for the loss, each rank
backpropagating through its own rows. Works the same under DDP and DeepSpeed ZeRO-2 (both average
the ranks' gradients; ZeRO-2 then reduce-scatters them into its optimizer-state shards)."""

from __future__ import annotations

from typing import Tuple

import torch


def gather_with_grad(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """All ranks' rows in rank order, this rank's keeping their gradient (the others are
    constants); returns the concatenation and the world size. Same-size batches on every rank
    (drop_last) are assumed.

    Every rank then computes the same loss over the whole step's batch, but backpropagates only
    through its own rows, and DDP (or ZeRO) averages the ranks' gradients: that is 1/world of the
    gradient one process would get over the whole batch. The own rows are therefore passed as
    ``world * x - (world - 1) * x.detach()``: the same values, ``world`` times the gradient, so
    training matches the single-process arithmetic at any world size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor, 1
    world = dist.get_world_size()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    own = tensor * world - tensor.detach() * (world - 1) if tensor.requires_grad else tensor
    parts[dist.get_rank()] = own
    return torch.cat(parts), world
