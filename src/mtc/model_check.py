"""The wrapper check: the activations we store must be the model's own.

Extraction reads sites through transformer_lens's ``TransformerBridge``, which re-implements parts
of some architectures (and edits the Hugging Face module it wraps: Cohere's logits move by 1e-4
once it is built). So before any row is written, the first batch runs through the plain Hugging
Face model with PyTorch hooks on its own modules, and the bridge's logits and requested sites must
agree with it within the dtype's tolerance; otherwise extraction stops naming the model type, the
site and the error.

The batch's logits are not all kept (Gemma 3's 262,144-token vocabulary makes them 2 GiB for 16
windows of 128 tokens, twice its weights, and the reference's must outlive the bridge's building):
compared are the hidden state the unembedding reads at every position (``final_hidden``: everything
before the unembedding, everywhere) and the logits, made by each forward's own code, at as many
positions as ``mtc.readout.LOGITS_BUDGET`` holds (all of them for a vocabulary of up to 8,192 tokens
and 16 x 128 positions; else spread evenly over the batch, first and last included): the unembedding
and what follows it are the same function at every position, so a wrapper that gets them wrong shows
there. The same hooks decide from the model's structure whether attention and MLP
run in parallel (then there is no ``resid_mid``): the MLP's input is checked for any dependence on
the attention's output.

Sites from the Hugging Face modules, at decoder layer ``i`` (the model's ModuleList of blocks):
``resid_pre`` = the block's input, ``resid_post`` = its output, ``mlp_out`` = what the block adds
from its MLP (the MLP module's output, its post-MLP norm's where there is one, as in Gemma-2 and 3, or
its second matrix's, as in OPT),
``resid_mid`` = ``resid_post - mlp_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtc.config import ConfigError
from mtc.models import Architecture, ModelError, load_bridge, run_sites
from mtc.readout import relative_error, rows_per_piece, unembedding_reads

ATTENTION = ("self_attn", "attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "ffn", "fc1")  # the MLP, or its first matrix (OPT): what reads the stream
MLP_OUT = ("post_feedforward_layernorm", "mlp", "feed_forward", "ffn", "fc2")  # what the block adds from it
# Relative error (Frobenius) allowed between the wrapper and the model, by forward dtype.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2}


class WrapperMismatch(ModelError):
    """The wrapper's activations are not the model's."""


def _first(parent: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(parent, n) for n in names if isinstance(getattr(parent, n, None), nn.Module)), None)


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class Structure:
    """Where a model's blocks, attention and MLP are, found by shape rather than by model type."""

    layers: nn.ModuleList
    attention: list[nn.Module | None]
    mlp_out: list[nn.Module | None]
    """Per layer, the module whose output the block adds to the residual stream from its MLP."""
    mlp: list[nn.Module | None]

    @classmethod
    def of(cls, hf_model: nn.Module, n_layers: int) -> Structure:
        layers = next(
            (m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None
        )
        if layers is None:
            raise WrapperMismatch(f"no list of {n_layers} decoder blocks in {type(hf_model).__name__}")
        return cls(
            layers,
            [_first(block, ATTENTION) for block in layers],
            [_first(block, MLP_OUT) for block in layers],
            [_first(block, MLP) for block in layers],
        )


def logit_positions(n_positions: int, vocab: int, budget: int | None = None) -> torch.Tensor:
    """The positions (of ``n_positions``, row-major over the batch) whose logits the check compares:
    all whose logits fit in ``budget`` elements, else that many spread evenly, first and last included."""
    n = min(n_positions, rows_per_piece(vocab, budget))
    return torch.linspace(0, n_positions - 1, n).round().long().unique()


def vocab_size(hf_model: nn.Module) -> int:
    return int(hf_model.get_output_embeddings().weight.shape[0])


@torch.no_grad()
def reference_sites(
    hf_model: nn.Module,
    structure: Structure,
    ids: torch.Tensor,
    wanted: list[tuple[int, str]],
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """(logits at ``positions`` [n, vocab], the hidden state the unembedding reads [B, T, d], the
    requested sites) of the plain Hugging Face forward on ``ids``; ``positions`` index the B * T
    positions row-major (default: all)."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key):
        return lambda module, args, kwargs, output=None: captured.__setitem__(
            key,
            _tensor(output if output is not None else (args[0] if args else kwargs["hidden_states"])).clone(),
        )

    for layer in sorted({layer for layer, _ in wanted}):
        block = structure.layers[layer]
        handles.append(block.register_forward_pre_hook(keep((layer, "resid_pre")), with_kwargs=True))
        handles.append(block.register_forward_hook(keep((layer, "resid_post")), with_kwargs=True))
        if structure.mlp_out[layer] is not None:
            handles.append(
                structure.mlp_out[layer].register_forward_hook(keep((layer, "mlp_out")), with_kwargs=True)
            )
    if positions is None:
        positions = torch.arange(ids.numel())
    try:
        with unembedding_reads(hf_model, positions) as seen:
            logits = hf_model(ids).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    for layer, site in list(captured):
        if site == "mlp_out":  # OPT's MLP works on [B * T, d] rows
            captured[(layer, site)] = captured[(layer, site)].reshape(captured[(layer, "resid_post")].shape)
    sites = {}
    for layer, site in wanted:
        if site == "resid_mid" and (layer, "mlp_out") in captured:
            sites[(layer, site)] = captured[(layer, "resid_post")] - captured[(layer, "mlp_out")]
        elif (layer, site) in captured:
            sites[(layer, site)] = captured[(layer, site)]
    return logits, seen["hidden"], sites


@torch.no_grad()
def parallel_attention(
    hf_model: nn.Module, structure: Structure, ids: torch.Tensor, layer: int = 0
) -> bool | None:
    """Whether the MLP of ``layer`` ignores the attention's output (attention and MLP in parallel),
    found by perturbing that output; None when the block has no attention or MLP module we find."""
    attn, mlp = structure.attention[layer], structure.mlp[layer]
    if attn is None or mlp is None:
        return None
    inputs = []
    grab = mlp.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0] if args else next(iter(kwargs.values()))).clone()),
        with_kwargs=True,
    )

    def perturb(module, args, output):
        first = _tensor(output)
        moved = first + first.abs().mean() * 10 + 1
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    try:
        with unembedding_reads(hf_model):  # no logits but the last position's: only the MLP's input counts
            hf_model(ids)
            nudge = attn.register_forward_hook(perturb)
            try:
                hf_model(ids)
            finally:
                nudge.remove()
    finally:
        grab.remove()
    return torch.equal(inputs[0], inputs[1])


def compare(
    model_type: str, dtype: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Relative errors of the wrapper's tensors against the model's, by name (``logits``,
    ``final_hidden``, ``L{layer}/{site}``); raises WrapperMismatch beyond tolerance."""
    tol = TOLERANCE[dtype]
    errors = {what: relative_error(got[what], x) for what, x in expected.items()}
    for what, err in errors.items():
        if not err <= tol:  # also catches NaN
            raise WrapperMismatch(
                f"{model_type}: transformer_lens's wrapper disagrees with the model's own Hugging Face "
                f"forward at {what} (relative error {err:.2e}, tolerance {tol:.0e} for {dtype}); "
                "refusing to write activations that are not the model's"
            )
    return errors


def checked_bridge(
    model_dir,
    hf_model: nn.Module,
    arch: Architecture,
    ids: torch.Tensor,
    wanted: list[tuple[int, str]],
    dtype: str,
    device: torch.device,
):
    """The TransformerBridge over ``hf_model``, once its logits and ``wanted`` sites on ``ids`` (the
    first batch) agree with the plain model's. Returns (bridge, relative errors): ``logits`` is the
    larger of the final hidden state's (every position) and the compared positions' logits'."""
    hf_model = hf_model.to(device).eval()
    structure = Structure.of(hf_model, arch.n_layers)
    mid_layers = sorted({layer for layer, site in wanted if site in ("resid_mid", "mlp_out")})
    for layer in mid_layers:
        if structure.mlp_out[layer] is None:
            raise WrapperMismatch(
                f"{arch.model_type}: no MLP module ({'/'.join(MLP_OUT)}) in decoder block {layer}; "
                "mlp_out and resid_mid cannot be checked there: extract resid_pre/resid_post"
            )
    if any(site == "resid_mid" for _, site in wanted) and parallel_attention(
        hf_model, structure, ids[:1], mid_layers[0]
    ):
        raise ConfigError(
            f"extract.sites: resid_mid does not exist in {arch.model_type} (its MLP does not read the "
            "attention's output: attention and MLP run in parallel); use resid_pre as the "
            "transcoder's source site, or resid_post"
        )
    positions = logit_positions(ids.numel(), vocab_size(hf_model))
    expected_logits, expected_hidden, expected_sites = reference_sites(
        hf_model, structure, ids, wanted, positions
    )
    try:
        bridge = load_bridge(model_dir, dtype, str(device), hf_model=hf_model)
        with torch.no_grad(), unembedding_reads(bridge, positions) as seen:
            got_logits = bridge(ids)[0].float()
        got_sites = run_sites(bridge, ids, wanted)
    except Exception as e:  # the wrapper's own failure on an architecture it does not handle
        detail = " ".join(str(e).split())[:160]
        raise ModelError(
            f"{arch.model_type}: transformer_lens's TransformerBridge cannot run this model "
            f"({type(e).__name__}: {detail})"
        ) from None
    expected = {"logits": expected_logits, "final_hidden": expected_hidden}
    got = {"logits": got_logits, "final_hidden": seen.get("hidden")}
    expected.update({f"L{layer}/{site}": x for (layer, site), x in expected_sites.items()})
    got.update({f"L{layer}/{site}": x for (layer, site), x in got_sites.items()})
    errors = compare(arch.model_type, dtype, expected, got)
    # One figure for the logits, as before: the larger of the two halves of their check.
    errors["logits"] = max(errors["logits"], errors.pop("final_hidden"))
    return bridge, errors
