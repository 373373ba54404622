"""Running under ``torchrun``: the process group, and the collectives extraction and training need.

``torchrun --nproc_per_node=N -m mtc.cli extract`` (or ``train``) starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; ``from_env()`` joins them into one group (gloo on CPU, nccl on GPU).
Without torchrun it returns a one-process context whose collectives do nothing, so the same code
path runs in both cases.

Extraction needs only a barrier (ranks write disjoint shards of the same store). Data-parallel
training (``DataParallel`` below) needs more than averaged gradients to equal a one-process run on
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

from mtc.dictionary import (
    MatryoshkaBatchTopK,
    SparseCodes,
    batch_topk_pairs,
    nonzero_by_group,
)


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
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(t, op=ops[op])
    return t


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-d tensors of different lengths from every rank (rank order)."""
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([t, t.new_zeros(longest - t.numel())])
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def _nth_largest_over_ranks(values: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n``-th largest of every rank's ``values`` together."""
    return _all_gather_cat(values).topk(n, sorted=False).values.min()


class DataParallel(MatryoshkaBatchTopK):
    """A dictionary trained on one rank's part of the global batch, equal to one process training on
    the whole batch (up to float rounding): global BatchTopK selection, global statistics, and
    gradients averaged over ranks (each rank's loss is a mean over an equal share of the rows).
    Its weights and buffers are the plain dictionary's: it saves and loads like one."""

    def _select(self, mm_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global batch's top ``k x B`` codes that fall on this rank.

        ``batch_topk_pairs`` gathers, on each rank, every entry above a bound that at least this
        rank's share (k x B_local) of entries reach; the threshold is the (k x B_global)-th largest
        of all ranks' candidates together. That is exact unless a rank holds more than its share of
        the global top entries and some lie below its bound: then that rank's smallest candidate is
        above the threshold, and every rank redoes the selection densely from the threshold found
        (a lower bound of the true one). With a shuffled batch this is rare.
        """
        world = torch.distributed.get_world_size()
        n_local = self.top_k * mm_BF.shape[0]
        bias = self.b_enc.detach()
        found = {}

        def global_threshold(cand: torch.Tensor, n: int) -> torch.Tensor:
            found["t"] = _nth_largest_over_ranks(cand, n * world)
            found["short"] = bool(cand.numel()) and bool(cand.min() > found["t"])
            return found["t"]

        rows, feats, vals = batch_topk_pairs(mm_BF, bias, n_local, self.boundaries,
                                             self._sample_generator(mm_BF.device), threshold_of=global_threshold)
        short = all_reduce(torch.tensor([int(found["short"])], device=mm_BF.device), "max")
        if not bool(short.item()):
            return rows, feats, vals
        pre = mm_BF.to(bias.dtype) + bias
        t = _nth_largest_over_ranks(pre[pre >= found["t"]], n_local * world)
        keep = (pre >= t) & (pre > 0)
        rows, feats = nonzero_by_group(lambda a, b: keep[:, a:b], self.boundaries).unbind(1)
        return rows, feats, pre[rows, feats]

    def _batch_stats(self, codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor]:
        fired, smallest = super()._batch_stats(codes)
        fired = all_reduce(fired.to(torch.int32), "max").bool()   # fired anywhere in the global batch
        return fired, all_reduce(smallest.reshape(1).clone(), "min")[0]

    @torch.no_grad()
    def init_means(self, x_BD: torch.Tensor, y_BD: torch.Tensor) -> None:
        world = torch.distributed.get_world_size()
        self.source_mean.copy_(all_reduce(self._scaled_source(x_BD).mean(dim=0), "sum") / world)
        self.b_dec.copy_(all_reduce(self._scaled_target(x_BD, y_BD).mean(dim=0), "sum") / world)


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce and average every gradient, in one flat buffer (what DDP's reducer does in buckets)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    all_reduce(flat, "sum").div_(torch.distributed.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- hooks for mtc.train
def check_batch_size(batch_size: int, name: str) -> None:
    world = from_env().world_size
    if batch_size % world:
        from mtc.config import ConfigError

        raise ConfigError(f"dictionaries.{name}.batch_size: {batch_size} does not split evenly over "
                          f"{world} ranks; use a multiple of {world}")


def shard_batch(xs: list[torch.Tensor], rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This rank's equal slice of a global batch (every rank reads the same global batch)."""
    ctx = from_env()
    if not ctx.active:
        return xs, rows
    n = rows.shape[0] // ctx.world_size
    part = slice(ctx.rank * n, (ctx.rank + 1) * n)
    return [x[part] for x in xs], rows[part]


def follower_results_root(results_root, cfgs: list) -> tuple:
    """Ranks other than 0 train into a scratch copy of rank 0's run directories (so they resume
    from the same checkpoint and make the same decisions) and never touch the real results.
    Returns (results_root, cfgs) to use; rank 0's are unchanged."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    ctx = from_env()
    if ctx.rank == 0:
        ctx.barrier()
        return results_root, cfgs
    scratch = Path(tempfile.mkdtemp(prefix=f"mtc-rank{ctx.rank}-"))
    for c in cfgs:
        src = c.run_dir(results_root)
        if src.is_dir():
            shutil.copytree(src, c.run_dir(scratch), ignore=shutil.ignore_patterns("*.tmp"))
    ctx.barrier()  # rank 0 starts changing its run directories only after every copy
    return scratch, [dataclasses.replace(c, wandb_project=None) for c in cfgs]
