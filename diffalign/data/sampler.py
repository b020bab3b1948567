"""A deterministic, resumable index stream for training.

Position p of the global stream is item perm_e[p mod n] with e = p // n and perm_e a permutation seeded by
(seed, e). Process r of W reads positions r, r+W, r+2W, ...; so a run resumed at position `start` (= pairs
already consumed by all processes) sees exactly the items the uninterrupted run would have seen, without
iterating the data again (peers re-iterate the loader, DiffusionDPO #hard_skip_resume).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self,
        n: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        with_epoch: bool = False,
    ):
        """with_epoch: yield epoch * n + item instead of item (see EpochView), so per-epoch augmentation is exact."""
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world_size
        self.shuffle, self.with_epoch = shuffle, with_epoch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def item_at(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        return int(self._permutation(epoch)[within])

    def __iter__(self):
        position = self.start + self.rank
        while True:
            item = self.item_at(position)
            yield (position // self.n) * self.n + item if self.with_epoch else item
            position += self.world

    def __len__(self) -> int:  # infinite stream; len is the dataset size for progress reporting
        return self.n


class EpochView(Dataset):
    """Reads keys `epoch * n + index` from ResumableSampler(with_epoch=True): sets the dataset's epoch, then indexes.

    The wrapped dataset draws its flips and caption dropout from (seed, epoch, index), so a resumed run gets the
    same augmentation as the uninterrupted one (each DataLoader worker holds its own copy of the dataset). Items
    also get "epoch" (int), so the trainer can key each pair's noise draws on (seed, epoch, index) the same way.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        self.dataset.set_epoch(epoch)
        item = self.dataset[index]
        if item is not None:  # None: a bad row skipped on request (collate counts it)
            item["epoch"] = epoch
        return item
