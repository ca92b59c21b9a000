"""ISC 2021 descriptor model: timm backbone -> GeM -> Linear(C, 256, no bias) -> BatchNorm1d -> L2;
contrastive loss inside a cross-batch memory bank.

Module names follow the seed's ``ISCNet`` (``backbone.*``, ``fc.weight``, ``bn.*``), so the weights
of its published checkpoints (``{"state_dict": {"module.backbone...": ...}, "args": Namespace}``)
match by name once ``module.`` is stripped (``hpc_jobs.engine.load_init_weights`` does that); those
files also pickle an argparse ``Namespace``, which safe loading refuses, so re-save their
``state_dict`` alone first. GeM's exponent is fixed, not learnt, with one
value for training (``gem_p``) and one for extraction (``gem_eval_p``), as the seed's flags.

The memory bank (XBM) keeps the last ``memory_size`` descriptors and labels of past batches; each
batch's loss pairs every descriptor of the batch with the batch itself and with the bank. Its
contents are training state: ``state_dict``/``load_state_dict`` save and restore them exactly, so a
resumed run continues with the same bank.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER_ARCH = "tf_efficientnetv2_m.in21k_ft_in1k"  # the seed's tf_efficientnetv2_m_in21ft1k


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling over H, W: ``mean(x^p)^(1/p)`` (p=1: average pooling)."""
    x = x.float().clamp(min=eps)
    if p == 1.0:
        return x.mean(dim=(-2, -1))
    return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eval_p: Optional[float] = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eval_p, self.eps = float(p), float(eval_p if eval_p is not None else p), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p if self.training else self.eval_p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eval_p={self.eval_p}"


def create_backbone(arch: str, pretrained: bool = False) -> nn.Module:
    """The timm network as a feature extractor of its last stage (``features_only``)."""
    import timm

    try:
        return timm.create_model(arch, pretrained=pretrained, features_only=True, out_indices=(-1,))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"timm has no model named {arch!r} (timm.list_models('*{arch.split('.')[0][:8]}*') "
                             "lists close names)") from None
        raise


def backbone_norm(arch: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) the backbone's pretrained weights expect (ImageNet's when unknown)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an unknown tag: fall back to ImageNet statistics
        cfg = None
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


class ISCNet(nn.Module):
    """Descriptor network: ``x -> L2(BN(fc(GeM(backbone(x)[-1]))))``, ``fc_dim``-d unit vectors."""

    def __init__(self, arch: str, fc_dim: int = 256, p: float = 1.0, eval_p: float = 1.0,
                 pretrained: bool = False, backbone: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone if backbone is not None else create_backbone(arch, pretrained)
        channels = self.backbone.feature_info.channels()[-1]
        self.pool = GeM(p, eval_p)
        self.fc = nn.Linear(channels, fc_dim, bias=False)
        self.bn = nn.BatchNorm1d(fc_dim)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[-1]
        pooled = self.pool(features)
        return F.normalize(self.bn(self.fc(pooled.to(self.fc.weight.dtype))), dim=1)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list:
    """The seed's parameter groups: no weight decay on biases, norms and other 1-d tensors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or "gain" in name else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# -- loss ----------------------------------------------------------------------------------------
def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` and ``b`` (safe gradient at 0)."""
    sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.t()).clamp(min=0.0)
    return torch.sqrt(sq + 1e-12)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: torch.Tensor,
                     ref_labels: torch.Tensor, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     self_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Contrastive loss of every (anchor, ref) pair: positives (same label) pay ``d - pos_margin``,
    negatives ``neg_margin - d``, both clipped at 0; each term is averaged over its pairs with a
    non-zero loss (so easy pairs do not dilute it) and the two are summed. ``self_mask`` marks the
    pairs of an anchor with itself, which are skipped."""
    dist = pairwise_distance(embeddings.float(), ref_embeddings.float())
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    valid = torch.ones_like(same) if self_mask is None else ~self_mask
    pos = F.relu(dist - pos_margin) * (same & valid)
    neg = F.relu(neg_margin - dist) * (~same & valid)

    def mean_nonzero(x: torch.Tensor) -> torch.Tensor:
        count = (x > 0).sum()
        return x.sum() / count.clamp(min=1)

    pos_loss, neg_loss = mean_nonzero(pos), mean_nonzero(neg)
    return {"loss": pos_loss + neg_loss, "pos_loss": pos_loss.detach(), "neg_loss": neg_loss.detach(),
            "pos_pairs": (same & valid).sum().detach(), "active_neg": (neg > 0).sum().detach()}


class CrossBatchMemory:
    """A FIFO bank of past (descriptor, label) pairs for the contrastive loss (XBM).

    ``loss(embeddings, labels)`` computes the loss of the batch against the batch plus the bank,
    then enqueues the batch (detached). ``warmup_batches``: the bank joins the loss only after that
    many batches (it fills meanwhile), as XBM's warm-up: a network trained from scratch moves its
    descriptors too fast at first for stale ones to be useful negatives. The bank lives on the
    embeddings' device; its state is plain tensors and ints, so checkpoints load with
    ``weights_only=True``.
    """

    def __init__(self, size: int, dim: int = 256, pos_margin: float = 0.0, neg_margin: float = 1.0,
                 warmup_batches: int = 0) -> None:
        if size < 0:
            raise ValueError(f"memory_size={size} must be 0 (no bank) or more")
        self.size, self.dim = int(size), int(dim)
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.warmup_batches = int(warmup_batches)
        self.embeddings = torch.zeros(self.size, self.dim)
        self.labels = torch.full((self.size,), -1, dtype=torch.long)
        self.ptr = 0      # next slot to write
        self.filled = 0   # slots holding an entry
        self.batches = 0  # batches seen (for the warm-up)

    def to(self, device: torch.device) -> "CrossBatchMemory":
        self.embeddings, self.labels = self.embeddings.to(device), self.labels.to(device)
        return self

    def contents(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings[: self.filled], self.labels[: self.filled]

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if self.size == 0:
            return
        emb, lab = embeddings.detach().float(), labels.detach()
        if len(emb) >= self.size:  # a batch larger than the bank: keep its last entries
            emb, lab = emb[-self.size:], lab[-self.size:]
        n = len(emb)
        idx = (torch.arange(n, device=self.embeddings.device) + self.ptr) % self.size
        self.embeddings[idx] = emb.to(self.embeddings.device)
        self.labels[idx] = lab.to(self.labels.device)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.embeddings.device != embeddings.device:
            self.to(embeddings.device)
        mem_emb, mem_lab = self.contents()
        self.batches += 1
        if self.batches <= self.warmup_batches:
            mem_emb, mem_lab = mem_emb[:0], mem_lab[:0]
        refs = torch.cat([embeddings, mem_emb.to(embeddings.dtype)])
        ref_labels = torch.cat([labels, mem_lab])
        n = len(embeddings)
        self_mask = torch.zeros(n, len(refs), dtype=torch.bool, device=embeddings.device)
        self_mask[:, :n] = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        out = contrastive_loss(embeddings, labels, refs, ref_labels, self.pos_margin, self.neg_margin, self_mask)
        self.enqueue(embeddings, labels)
        return out

    # training state, saved in every checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {"embeddings": self.embeddings.detach().cpu().clone(), "labels": self.labels.detach().cpu().clone(),
                "ptr": int(self.ptr), "filled": int(self.filled), "size": self.size, "dim": self.dim,
                "batches": int(self.batches)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a bank; one of another size keeps its most recent entries (as many as fit)."""
        device = self.embeddings.device
        self.batches = int(state.get("batches", 0))
        if int(state["dim"]) != self.dim:
            raise ValueError(f"memory bank of {state['dim']}-d descriptors cannot load into a {self.dim}-d bank")
        if int(state["size"]) == self.size:
            self.embeddings = state["embeddings"].to(device).clone()
            self.labels = state["labels"].to(device).clone()
            self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
            return
        old = CrossBatchMemory(int(state["size"]), self.dim)
        old.load_state_dict(state)
        batches = self.batches
        emb, lab = old.contents()
        if old.filled == old.size:  # oldest first
            order = torch.cat([torch.arange(old.ptr, old.size), torch.arange(0, old.ptr)])
            emb, lab = emb[order], lab[order]
        self.embeddings = torch.zeros(self.size, self.dim, device=device)
        self.labels = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = self.filled = 0
        self.enqueue(emb.to(device), lab.to(device))
        self.batches = batches


class EpochLinearDecay:
    """LambdaLR factor stepped per optimizer step: ``1 - epoch / epochs`` (the seed's
    adjust_learning_rate, applied at every epoch start). An object, not a function, so the
    scheduler's state (and a resume) keeps it."""

    def __init__(self, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch, self.epochs = max(1, int(steps_per_epoch)), max(1, int(epochs))

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - (step // self.steps_per_epoch) / self.epochs)


def gather_with_grad(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """All ranks' rows in rank order, this rank's keeping their gradient (the others are
    constants); returns the concatenation and the world size. Same-size batches on every rank
    (drop_last) are assumed.

    Every rank then computes the same loss over the whole step's batch, but backpropagates only
    through its own rows, and DDP averages the ranks' gradients: that is 1/world of the gradient
    one process would get over the whole batch. The own rows are therefore passed as
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
