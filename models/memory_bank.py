"""Cross-batch memory (XBM): a FIFO bank of past descriptors and labels that joins every batch's
contrastive loss as extra references. Its contents are training state: ``state_dict`` /
``load_state_dict`` save and restore them exactly, so a resumed run continues with the same bank."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .contrastive_loss import contrastive_loss


class CrossBatchMemory:
    """A FIFO bank of past (descriptor, label) pairs for the contrastive loss (XBM).

    ``loss(embeddings, labels)`` computes the loss of the batch against the batch plus the bank,
    then enqueues the batch (detached). ``warmup_batches``: the bank joins the loss only after that
    many batches (it fills meanwhile), as XBM's warm-up: a network trained from scratch moves its
    descriptors too fast at first for stale ones to be useful negatives. The bank lives on the
    embeddings' device; its state is plain tensors and ints, so checkpoints load with
    ``weights_only=True``. ``size=0``: no bank, the loss of the batch alone.
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
