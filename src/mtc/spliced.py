"""Spliced loss: the model's next-token loss with a dictionary in place of the site it reconstructs.

For every held-out window: one clean forward pass (which also captures the dictionary's source
activations), then one forward pass per replacement of the target site — zero ablation, mean
ablation, and the dictionary's reconstruction at every Matryoshka prefix. A transcoder's output
replaces its target (``mlp_out``: the MLP's output); an SAE's reconstruction replaces its site.

With ``prepend_bos`` the BOS position is neither spliced (dictionaries are never trained on BOS
rows) nor scored: the loss covers the predictions made at positions 1 .. T-2.

No pass keeps its [B, T, vocab] logits: each keeps the hidden state the unembedding reads, and the
losses come from it in pieces of a few rows (``mtc.readout``), so memory follows the batch's
activations and not the vocabulary (Gemma 3's 262,144 tokens).

TransformerBridge (transformer_lens 3.9) cannot start a forward pass at a layer
(``start_at_layer`` raises NotImplementedError), so every spliced pass runs the whole model; on
SmolLM2-135M layers 0-8 are about a quarter of its cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtc import progress
from mtc.config import SITES, ConfigError
from mtc.dictionary import MatryoshkaBatchTopK
from mtc.metrics import ce_loss_recovered
from mtc.models import hook_name
from mtc.readout import Readout, final_hidden

# Order of the sites within a layer: a site can only be spliced from sources computed before it.
SITE_ORDER = {site: i for i, site in enumerate(SITES)}


def check_splice_order(source: tuple[int, str], target: tuple[int, str], key: str = "target_site") -> None:
    """A spliced dictionary reads its source and writes its target in one forward pass: the source
    must come first (or be the target itself, as for an SAE)."""
    (sl, ss), (tl, ts) = source, target
    if (tl, SITE_ORDER[ts]) < (sl, SITE_ORDER[ss]):
        raise ConfigError(
            f"{key}: {ts} at layer {tl} comes before the source {ss} at layer {sl} in the forward "
            "pass, so the dictionary cannot be spliced in"
        )


def splice_hooks(
    target: tuple[int, str], value_BTD: torch.Tensor, keep_BT: torch.Tensor | None = None
) -> list[tuple[str, Any]]:
    """Forward hooks that make the residual stream carry ``value_BTD`` at ``target`` (layer, site);
    positions where ``keep_BT`` is True keep the model's own value.

    TransformerBridge's ``hook_resid_mid`` is the input of the MLP's norm (``ln2.hook_in``): changing
    it changes what the MLP reads but not the residual stream that bypasses the MLP. So a resid_mid
    splice also adds the change to ``mlp_out``, making resid_post = new resid_mid + MLP(new resid_mid).
    The other sites are the residual stream itself (resid_pre, resid_post) or are added to it (mlp_out).
    """
    layer, site = target
    delta: dict[str, torch.Tensor] = {}

    def replace(x: torch.Tensor, hook: Any) -> torch.Tensor:
        new = value_BTD.to(x.dtype)
        if keep_BT is not None:
            new = torch.where(keep_BT[..., None], x, new)
        if site == "resid_mid":
            delta["resid_mid"] = new - x
        return new

    hooks = [(hook_name(site, layer), replace)]
    if site == "resid_mid":
        hooks.append((hook_name("mlp_out", layer), lambda x, hook: x + delta.pop("resid_mid")))
    return hooks


class Replacements:
    """What goes into the target site, per name: the ablations and every prefix of the dictionary."""

    def __init__(self, dictionary: MatryoshkaBatchTopK, mean_target_D: torch.Tensor):
        self.dictionary = dictionary
        self.mean = mean_target_D
        self.n_groups = len(dictionary.group_sizes)

    def names(self) -> list[str]:
        return ["zero_ablation", "mean_ablation"] + [f"prefix_{g}" for g in range(1, self.n_groups + 1)]

    def build(self, source_BTD: torch.Tensor, d_out: int) -> dict[str, torch.Tensor]:
        B, T, _ = source_BTD.shape
        source = source_BTD.reshape(B * T, -1).float()
        acts = self.dictionary.encode(source)
        out = {
            "zero_ablation": source_BTD.new_zeros(B, T, d_out, dtype=torch.float32),
            "mean_ablation": self.mean.to(source_BTD.device).float().expand(B, T, d_out),
        }
        for g in range(1, self.n_groups + 1):
            out[f"prefix_{g}"] = self.dictionary.decode(acts, g, source=source).reshape(B, T, d_out)
        return out


def bos_masks(tokens_BT: torch.Tensor, skip_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep_BT``: positions a splice leaves as the model made them (BOS with ``skip_bos``);
    ``scored_BT`` [B, T-1]: the predictions scored (position t predicts token t+1; not BOS's)."""
    B, T = tokens_BT.shape
    keep_BT = torch.zeros(B, T, dtype=torch.bool, device=tokens_BT.device)
    scored_BT = torch.ones(B, T - 1, dtype=torch.bool, device=tokens_BT.device)
    if skip_bos:
        keep_BT[:, 0] = True
        scored_BT[:, 0] = False
    return keep_BT, scored_BT


def hidden_run(bridge: Any, tokens_BT: torch.Tensor, readout: Readout, fwd_hooks: list | None = None):
    """The hidden state the unembedding reads [B, T, d] of one forward pass with ``fwd_hooks``; the
    pass unembeds only each row's last position, which ``readout`` must reproduce."""
    hidden_BTD, last_logits_BV = final_hidden(bridge, tokens_BT, fwd_hooks)
    readout.check(hidden_BTD[:, -1], last_logits_BV)
    return hidden_BTD


def clean_run(
    bridge: Any, tokens_BT: torch.Tensor, source: tuple[int, str], readout: Readout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean hidden state the unembedding reads [B, T, d] and the source activation [B, T, d]
    of the same forward pass."""
    captured: dict[str, torch.Tensor] = {}

    def capture(x: torch.Tensor, hook: Any) -> torch.Tensor:
        captured["source"] = x.detach()
        return x

    hidden = hidden_run(bridge, tokens_BT, readout, [(hook_name(source[1], source[0]), capture)])
    return hidden, captured["source"]


class RunningSoftmax:
    """Per row, over the vocabulary a tile of logits at a time: the largest logit so far and its
    token (the first, on ties, as ``argmax``), the sum of exp(logit - largest) and the target's logit."""

    def __init__(self, targets_N: torch.Tensor):
        n = targets_N.numel()
        self.targets = targets_N
        self.max = torch.full((n,), -math.inf, device=targets_N.device)
        self.argmax = torch.zeros(n, dtype=torch.long, device=targets_N.device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=targets_N.device)
        self.target = torch.zeros(n, dtype=torch.float64, device=targets_N.device)

    def add(self, logits_NC: torch.Tensor, tokens: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Take in the logits of ``tokens``; returns (the factor [N] that rescales sums made relative
        to the former largest logit, exp(logits - largest) [N, C])."""
        tile_max, tile_argmax = logits_NC.max(dim=1)
        new_max = torch.maximum(self.max, tile_max)
        self.argmax = torch.where(tile_max > self.max, tile_argmax + tokens.start, self.argmax)
        rescale = torch.exp(self.max - new_max).double()  # 0 on the first tile
        weights = torch.exp(logits_NC - new_max[:, None])
        self.sum = self.sum * rescale + weights.sum(dim=1).double()
        self.max = new_max
        inside = torch.nonzero((self.targets >= tokens.start) & (self.targets < tokens.stop)).flatten()
        self.target[inside] = logits_NC[inside, self.targets[inside] - tokens.start].double()
        return rescale, weights

    def logsumexp(self) -> torch.Tensor:
        return self.max.double() + self.sum.log()


def loss_sums(
    readout: Readout,
    clean_ND: torch.Tensor,
    replaced: dict[str, torch.Tensor],
    targets_N: torch.Tensor,
    *,
    top1: bool = False,
    logits_budget: int | None = None,
) -> tuple[float, dict[str, dict[str, float]]]:
    """From the hidden states [N, d] of N scored predictions (clean, and per replacement): the
    summed clean CE, and per replacement the summed CE and KL(clean || replaced) (and, with
    ``top1``, how many predictions keep the clean model's most likely token).

    The logits exist one [rows, tokens] tile at a time (``Readout.tiles``, at most ``logits_budget``
    elements), the softmax's normaliser accumulated over the tiles (``RunningSoftmax``):
    KL = sum_v p(v) (z(v) - z'(v)) - logsumexp z + logsumexp z' for clean logits z, replaced z'."""
    ce_clean = 0.0
    sums = {name: {"ce": 0.0, "kl": 0.0} | ({"top1_agreement": 0} if top1 else {}) for name in replaced}
    row_pieces, token_tiles = readout.tiles(targets_N.numel(), logits_budget)
    for rows in row_pieces:
        clean = RunningSoftmax(targets_N[rows])
        running = {name: RunningSoftmax(targets_N[rows]) for name in replaced}
        cross = dict.fromkeys(replaced, 0.0)  # per row: sum_v exp(z(v) - max z) (z(v) - z'(v))
        for tokens in token_tiles:
            clean_NC = readout(clean_ND[rows], tokens).float()
            rescale, weights_NC = clean.add(clean_NC, tokens)
            for name, hidden_ND in replaced.items():
                logits_NC = readout(hidden_ND[rows], tokens).float()
                running[name].add(logits_NC, tokens)
                cross[name] = (
                    cross[name] * rescale + (weights_NC * (clean_NC - logits_NC)).sum(dim=1).double()
                )
                del logits_NC
        clean_lse = clean.logsumexp()
        ce_clean += float((clean_lse - clean.target).sum())
        for name, r in running.items():
            lse = r.logsumexp()
            sums[name]["ce"] += float((lse - r.target).sum())
            sums[name]["kl"] += float((cross[name] / clean.sum - clean_lse + lse).sum())
            if top1:
                sums[name]["top1_agreement"] += int((r.argmax == clean.argmax).sum())
    return ce_clean, sums


@torch.no_grad()
def spliced_loss(
    bridge: Any,
    windows_ST: torch.Tensor,
    replacements: Replacements,
    source: tuple[int, str],
    target: tuple[int, str],
    *,
    batch_size: int,
    skip_bos: bool,
    logits_budget: int | None = None,
) -> dict[str, Any]:
    """Clean, ablated and spliced next-token CE and KL(clean || spliced) on ``windows_ST`` (token ids).
    The logits exist a few rows at a time (at most ``logits_budget`` elements; ``mtc.readout``)."""
    check_splice_order(source, target)
    device = next(bridge.parameters()).device
    readout = Readout(bridge)
    d_out = replacements.dictionary.shape.d_out
    names = replacements.names()
    ce = dict.fromkeys(["clean"] + names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    n_scored = 0
    with progress.bar("spliced loss", total=windows_ST.shape[0], unit="windows") as advance:
        for tokens in windows_ST.split(batch_size):
            tokens = tokens.to(device).long()
            B = tokens.shape[0]
            keep_BT, scored_BT = bos_masks(tokens, skip_bos)
            targets_N = tokens[:, 1:][scored_BT]
            hidden, source_BTD = clean_run(bridge, tokens, source, readout)
            clean_ND = hidden[:, :-1][scored_BT]
            replaced = {
                name: hidden_run(bridge, tokens, readout, splice_hooks(target, value, keep_BT))[:, :-1][
                    scored_BT
                ]
                for name, value in replacements.build(source_BTD, d_out).items()
            }
            clean, sums = loss_sums(readout, clean_ND, replaced, targets_N, logits_budget=logits_budget)
            ce["clean"] += clean
            for name, s in sums.items():
                ce[name] += s["ce"]
                kl[name] += s["kl"]
            n_scored += targets_N.numel()
            advance(B)
    ce = {k: v / n_scored for k, v in ce.items()}
    kl = {k: v / n_scored for k, v in kl.items()}
    prefixes = [f"prefix_{g}" for g in range(1, replacements.n_groups + 1)]
    return {
        "ce_clean": ce["clean"],
        "ce_zero_ablation": ce["zero_ablation"],
        "ce_mean_ablation": ce["mean_ablation"],
        "ce_spliced_per_prefix": [ce[p] for p in prefixes],
        "ce_recovered_vs_zero_per_prefix": [
            ce_loss_recovered(ce["clean"], ce[p], ce["zero_ablation"]) for p in prefixes
        ],
        "ce_recovered_vs_mean_per_prefix": [
            ce_loss_recovered(ce["clean"], ce[p], ce["mean_ablation"]) for p in prefixes
        ],
        "kl_per_prefix": [kl[p] for p in prefixes],
        "kl_zero_ablation": kl["zero_ablation"],
        "kl_mean_ablation": kl["mean_ablation"],
        "ce_n_sequences": int(windows_ST.shape[0]),
        "ce_n_tokens": n_scored,
    }
