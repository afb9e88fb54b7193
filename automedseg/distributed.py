"""Rank bookkeeping of a (torchrun) distributed training run; one process is rank 0 of 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Dist:
    """Rank bookkeeping; a single process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, device: torch.device) -> Dist:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// set by torchrun
        return cls(td.get_rank(), td.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t)
        return t.numpy()

    def min_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.int64)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())

    def weights_identical(self, model: torch.nn.Module) -> tuple[bool, float]:
        """Whether every rank holds the same weights (a checksum compared across ranks)."""
        with torch.no_grad():
            s = float(sum(p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in model.parameters()))
        if self.world == 1:
            return True, s
        import torch.distributed as td

        gathered: list[Any] = [None] * self.world
        td.all_gather_object(gathered, s)
        return all(g == gathered[0] for g in gathered), s

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()
