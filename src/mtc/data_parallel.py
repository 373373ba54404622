"""The dictionary trained data-parallel under ``torchrun``: one rank's share of the global batch.

Equal to one process training on the whole batch (up to float rounding): BatchTopK keeps the ``k x B``
largest pre-activations of the *global* batch, so the selection's threshold is found from every
rank's candidates, and the statistics the dictionary keeps (which features fired, the threshold's
running average, the input means of the first batch) are reduced over all ranks too.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from mtc import distributed
from mtc.dictionary import MatryoshkaBatchTopK, SparseCodes, batch_topk_pairs, nonzero_by_group
from mtc.distributed import all_reduce
from mtc.results import run_dir_of


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
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


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

        rows, feats, vals = batch_topk_pairs(
            mm_BF,
            bias,
            n_local,
            self.boundaries,
            self._sample_generator(mm_BF.device),
            threshold_of=global_threshold,
        )
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
        fired = all_reduce(fired.to(torch.int32), "max").bool()  # fired anywhere in the global batch
        return fired, all_reduce(smallest.reshape(1).clone(), "min")[0]

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t.clone(), "sum")


def follower_results_root(results_root, cfgs: list) -> tuple:
    """Ranks other than 0 train into a scratch copy of rank 0's run directories (so they resume
    from the same checkpoint and make the same decisions) and never touch the real results.
    Returns (results_root, cfgs) to use; rank 0's are unchanged."""
    ctx = distributed.from_env()
    if ctx.rank == 0:
        ctx.barrier()
        return results_root, cfgs
    scratch = Path(tempfile.mkdtemp(prefix=f"mtc-rank{ctx.rank}-"))
    for c in cfgs:
        src = run_dir_of(c, results_root)
        if src.is_dir():
            shutil.copytree(src, run_dir_of(c, scratch), ignore=shutil.ignore_patterns("*.tmp"))
    ctx.barrier()  # rank 0 starts changing its run directories only after every copy
    return scratch, [dataclasses.replace(c, wandb_project=None) for c in cfgs]
