"""Logits a few rows at a time, from the hidden state the model's unembedding reads.

A causal LM's forward ends by unembedding every position: [B, T, vocab] logits, which for Gemma 3's
262,144-token vocabulary are 1 GiB for 8 windows of 128 tokens, as much as the model's weights. The
stages that need only a loss or a comparison keep instead the hidden state the unembedding reads
([B, T, d], 400 times smaller there) and unembed it in pieces of at most ``LOGITS_BUDGET`` logits:

- ``unembedding_reads``: within it, a forward pass of the model (the plain Hugging Face one or the
  wrapper's) keeps that hidden state and unembeds only the positions asked for, through the model's
  own code (so its logits there are the forward's own);
- ``Readout``: the model's logits for any rows of that hidden state (its unembedding module, then
  what its forward does to the result: Gemma-2's and Gemma-3's final soft cap, Cohere's logit scale,
  Granite's divisor), refusing in one line a model whose forward's logits it does not reproduce.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mtc.errors import ModelError

LOGITS_BUDGET = 1 << 24
"""Logits computed at once: [rows, vocab] pieces of at most this many elements (64 MiB in float32;
Gemma 3: 64 rows, SmolLM2: 341, a 512-token test model: 32,768)."""

READOUT_TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
"""Relative error (Frobenius) allowed between ``Readout``'s logits and the forward's own, by dtype:
the same operations on the same rows, differing at most in the matmul's rounding."""


def rows_per_piece(vocab: int, budget: int | None = None) -> int:
    """How many rows of logits fit in ``budget`` elements (``LOGITS_BUDGET``; at least one row)."""
    return max(1, (LOGITS_BUDGET if budget is None else budget) // vocab)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return float(
        torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-12)
    )


def causal_lm(model: Any) -> nn.Module:
    """The Hugging Face causal LM itself: ``model``, or the one a TransformerBridge wraps."""
    return getattr(model, "original_model", model)


@contextmanager
def unembedding_reads(model: Any, positions: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
    """Within the block, every forward pass of ``model`` (a Hugging Face causal LM, or a
    TransformerBridge over one) leaves the hidden state its unembedding reads [B, T, d] in
    ``seen["hidden"]`` and unembeds only ``positions`` (indices into the B * T positions, row-major;
    by default the last position of each row): the forward returns those logits [1, n, vocab], made
    by the model's own code. A forward that does not unembed raises ModelError."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ModelError(
            f"{type(causal_lm(model)).__name__}: no output embedding (lm_head) to read logits from"
        )
    seen: dict[str, Any] = {}

    def only_positions(module, args, kwargs):
        if not args or args[0].dim() != 3:
            raise ModelError(
                f"{type(causal_lm(model)).__name__}: its unembedding was not given the hidden state "
                "[batch, positions, d] first; mtc cannot read its logits in pieces"
            )
        hidden = seen["hidden"] = args[0]
        B, T, d = hidden.shape
        where = positions if positions is not None else torch.arange(1, B + 1) * T - 1
        return (hidden.reshape(1, B * T, d)[:, where.to(hidden.device)], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(only_positions, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def final_hidden(bridge: Any, tokens_BT: torch.Tensor, fwd_hooks: list | None = None):
    """(the hidden state the unembedding reads [B, T, d], the forward's own logits [B, vocab] at the
    last position of each row) of ``bridge`` run on ``tokens_BT`` with ``fwd_hooks``."""
    with unembedding_reads(bridge) as seen:
        logits = bridge.run_with_hooks(tokens_BT, fwd_hooks=fwd_hooks or [])
    if "hidden" not in seen:
        raise ModelError(
            f"{type(causal_lm(bridge)).__name__}: its forward pass never called its output embedding; "
            "mtc cannot read its logits in pieces"
        )
    return seen["hidden"], logits[0]


VOCAB_TILE = 8192
"""Tokens unembedded at a time by ``Readout.tiles``: [rows, 8192] tiles let the matmul reuse each
piece of the unembedding it reads for many rows (a few rows against the whole vocabulary would read
all of it per few rows: a third slower on Gemma 3)."""


class Readout:
    """The model's logits for rows [N, d] of the hidden state its unembedding reads, on any slice of
    the vocabulary: its unembedding (a linear map, the bridge's or the model's own), then what the
    model's forward does to its output (``final_logit_softcapping``, ``logit_scale``,
    ``logits_scaling`` in its config), in that order and with those operations."""

    def __init__(self, model: Any):
        lm = causal_lm(model)
        head = lm.get_output_embeddings()
        linear = getattr(head, "original_component", head)  # inside the bridge's UnembeddingBridge
        config = lm.config
        self.model_type = getattr(config, "model_type", type(lm).__name__)
        if not isinstance(linear, nn.Linear):
            raise ModelError(
                f"{self.model_type}: its unembedding is a {type(linear).__name__}, not a linear map; mtc "
                "cannot compute its logits in pieces"
            )
        self.weight, self.bias = linear.weight, linear.bias
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None) if self.model_type.startswith("cohere") else None
        self.divisor = (
            getattr(config, "logits_scaling", None) if self.model_type.startswith("granite") else None
        )
        dtype = str(self.weight.dtype).removeprefix("torch.")
        self.tolerance = READOUT_TOLERANCE.get(dtype, READOUT_TOLERANCE["bfloat16"])

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, hidden_ND: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """Logits [N, tokens] of ``hidden_ND`` on the vocabulary's ``tokens`` (all by default)."""
        bias = None if self.bias is None else self.bias[tokens]
        logits = torch.nn.functional.linear(hidden_ND, self.weight[tokens], bias)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    @torch.no_grad()
    def check(self, hidden_ND: torch.Tensor, expected_ND: torch.Tensor) -> None:
        """Refuse (one line) a model whose forward made other logits ``expected_ND`` of these rows."""
        err = relative_error(self(hidden_ND), expected_ND)
        if not err <= self.tolerance:  # also catches NaN
            raise ModelError(
                f"{self.model_type}: its logits from the final hidden state (lm_head, then its config's "
                f"soft cap or scale) differ from its forward pass's (relative error {err:.2e}, tolerance "
                f"{self.tolerance:.0e}); mtc cannot compute its loss in pieces"
            )

    def tiles(self, n_rows: int, budget: int | None = None) -> tuple[list[slice], list[slice]]:
        """(row slices, token slices) of [rows, tokens] tiles of ``n_rows`` rows' logits, each of at
        most ``budget`` elements (``LOGITS_BUDGET``) and ``VOCAB_TILE`` tokens."""
        cols = min(self.vocab, VOCAB_TILE)
        step = rows_per_piece(cols, budget)
        rows = [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]
        return rows, [slice(first, min(first + cols, self.vocab)) for first in range(0, self.vocab, cols)]
