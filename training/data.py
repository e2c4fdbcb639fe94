"""Training data generated in code (no downloads), and a loader that resumes mid-epoch exactly.

Each sequence follows its own affine rule ``x[t+1] = (a * x[t] + b) mod V``; a
model that infers (a, b) from the prefix predicts the rest. The loader shuffles
each epoch with a generator seeded by (seed, epoch), so the order depends only on
the epoch, and it remembers the position the *training step* reached (not what
Lightning prefetched), so a resumed run sees exactly the batches it had not seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def make_sequences(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(1, vocab, (n, 1), generator=g)
    b = torch.randint(0, vocab, (n, 1), generator=g)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :1] = torch.randint(0, vocab, (n, 1), generator=g)
    for t in range(1, length):
        x[:, t : t + 1] = (a * x[:, t - 1 : t] + b) % vocab
    return x


class ResumableLoader:
    """An iterable of batches with ``state_dict``/``load_state_dict`` (Lightning restores it).

    Batches are dicts: ``tokens`` plus the ``epoch`` and ``index`` they came from;
    the model calls :meth:`mark_consumed` with them in ``training_step``.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._next_epoch = 0
        self._resume_at: tuple[int, int] | None = None
        self._consumed: tuple[int, int] | None = None  # (epoch, next batch index)

    def __len__(self) -> int:
        return len(self.data) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._next_epoch, 0
        if self._resume_at is not None:
            epoch, start = self._resume_at
            self._resume_at = None
            if start >= len(self):
                epoch, start = epoch + 1, 0
        self._next_epoch = epoch + 1
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_step = self.batch_size * self.world_size
        for index in range(start, len(self)):
            chunk = order[index * per_step : (index + 1) * per_step]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield {"tokens": self.data[mine], "epoch": torch.tensor(epoch), "index": torch.tensor(index)}

    def mark_consumed(self, batch: dict[str, Any]) -> None:
        self._consumed = (int(batch["epoch"]), int(batch["index"]) + 1)

    def state_dict(self) -> dict[str, int]:
        epoch, next_index = self._consumed if self._consumed is not None else (self._next_epoch, 0)
        return {"epoch": epoch, "next_index": next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["next_index"]))
        self._consumed = self._resume_at
