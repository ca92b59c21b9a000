"""Data order as a pure function of (seed, epoch): the basis of exact resume.

- ``EpochSampler`` is a DistributedSampler (also at world size 1) that can start mid-epoch: a
  resumed run skips the batches already seen without loading them.
- With ``seed_samples`` the sampler yields ``(index, seed)`` keys and ``SeededDataset`` seeds
  python/numpy/torch RNGs from (seed, epoch, index) around each ``__getitem__``, so random
  augmentations do not depend on worker count, worker assignment or where a run resumed.
"""

from __future__ import annotations

import hashlib
import random
import signal
from typing import Any, Iterator, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``dataset[(index, seed)]`` runs ``inner[index]`` with all RNGs
    seeded by ``seed`` and restores the caller's RNG state afterwards."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: List[Any]) -> List[Any]:
        """A whole batch (the DataLoader's fast path): the caller's RNG states are saved and
        restored once per batch, each sample still draws from its own seed. Defining it here also
        keeps the loader from calling an inner dataset's ``__getitems__`` with (index, seed) keys."""
        if not all(isinstance(k, tuple) for k in keys):  # plain indices: the caller's RNG, as is
            if any(isinstance(k, tuple) for k in keys):
                return [self.__getitems__([k])[0] for k in keys]
            return [self.dataset[k] for k in keys]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            out = []
            for index, seed in keys:
                random.seed(seed)
                np.random.seed(seed % 2**32)
                # the CPU generator only (the one restored below): torch.manual_seed would also
                # reseed every CUDA generator, which nothing here restores, and costs ~1 ms
                torch.default_generator.manual_seed(seed)
                out.append(self.dataset[index])
            return out
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def __getattr__(self, name: str) -> Any:  # expose the inner dataset's attributes
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochSampler(DistributedSampler):
    """This rank's shard of a (seed, epoch)-shuffled order, starting ``start`` samples in."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool, seed_samples: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0
        self.seed_samples = seed_samples

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())[self.start:]
        if not self.seed_samples:
            return iter(indices)
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class DeviceLoader:
    """Iterates a DataLoader and moves each batch to the device; ``.dataset`` is the task's own."""

    def __init__(self, loader: DataLoader, device: torch.device, dataset: Dataset) -> None:
        self.loader, self.device, self.dataset = loader, device, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield move_to_device(batch, self.device)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals Slurm sends to every process of the step: the main
    process checkpoints first, and the workers exit with it (they watch their parent)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_loader(dataset: Dataset, *, batch_size: int, sampler: Any, num_workers: int, device: torch.device,
                 collate_fn: Any, drop_last: bool, seed_samples: bool,
                 generator: torch.Generator | None = None) -> DeviceLoader:
    """A DataLoader over ``dataset`` with the given sampler. ``generator`` (reseeded by the trainer
    every epoch) keeps the loader from drawing its worker base seed from the global RNG."""
    loader = DataLoader(
        SeededDataset(dataset) if seed_samples else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=generator,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )
    return DeviceLoader(loader, device, dataset)
