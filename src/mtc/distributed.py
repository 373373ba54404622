"""Running under ``torchrun``: the process group, and the collectives extraction and training need.

``torchrun --nproc_per_node=N -m mtc.cli extract`` (or ``train``) starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; ``from_env()`` joins them into one group (gloo on CPU, nccl on GPU).
Without torchrun it returns a one-process context whose collectives do nothing, so the same code
path runs in both cases.

Extraction needs only a barrier (ranks write disjoint shards of the same store). Data-parallel
training (``mtc.data_parallel.DataParallel``) needs more than averaged gradients to equal a one-process run on
the global batch: BatchTopK keeps the ``k x B`` largest pre-activations of the *global* batch, so
the selection's threshold is found from every rank's candidates; the statistics the dictionary keeps (which
features fired, the threshold's running average, the input means of the first batch) are reduced
over all ranks too.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def device(self, device: str) -> torch.device:
        """The device this rank runs on: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under torchrun."""
        from mtc.models import resolve_device

        resolved = resolve_device(device)
        if self.active and resolved.type == "cuda" and resolved.index is None:
            return torch.device("cuda", self.local_rank)
        return resolved


_CONTEXT: Context | None = None


def from_env() -> Context:
    """The process group of this torchrun job (joined once), or a one-process context."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _CONTEXT = Context()
        return _CONTEXT
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # A resumed extraction can leave ranks waiting long at the final barrier: a generous timeout.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=12))
    _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), local_rank)
    return _CONTEXT


# ----------------------------------------------------------------------------- data-parallel training
def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    ops = {
        "sum": torch.distributed.ReduceOp.SUM,
        "max": torch.distributed.ReduceOp.MAX,
        "min": torch.distributed.ReduceOp.MIN,
    }
    torch.distributed.all_reduce(t, op=ops[op])
    return t


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce and average every gradient, in one flat buffer (what DDP's reducer does in buckets)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    all_reduce(flat, "sum").div_(torch.distributed.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- hooks for mtc.train
def check_batch_size(batch_size: int, name: str) -> None:
    world = from_env().world_size
    if batch_size % world:
        from mtc.config import ConfigError

        raise ConfigError(
            f"dictionaries.{name}.batch_size: {batch_size} does not split evenly over "
            f"{world} ranks; use a multiple of {world}"
        )


def shard_batch(xs: list[torch.Tensor], rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This rank's equal slice of a global batch (every rank reads the same global batch)."""
    ctx = from_env()
    if not ctx.active:
        return xs, rows
    n = rows.shape[0] // ctx.world_size
    part = slice(ctx.rank * n, (ctx.rank + 1) * n)
    return [x[part] for x in xs], rows[part]
