"""A deterministic, resumable index stream for training.

Position p of the global stream is item perm_e[p mod n] with e = p // n and perm_e a permutation seeded by
(seed, e). Process r of W reads positions r, r+W, r+2W, ...; so a run resumed at position `start` (= pairs
already consumed by all processes) sees exactly the items the uninterrupted run would have seen, without
iterating the data again (peers re-iterate the loader, DiffusionDPO #hard_skip_resume).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world_size
        self.shuffle = shuffle
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
            yield self.item_at(position)
            position += self.world

    def __len__(self) -> int:  # infinite stream; len is the dataset size for progress reporting
        return self.n
