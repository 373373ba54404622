"""The wrapper check: the activations we store must be the model's own.

Extraction reads sites through transformer_lens's ``TransformerBridge``, which re-implements parts
of some architectures (and edits the Hugging Face module it wraps: Cohere's logits move by 1e-4
once it is built). So before any row is written, the first batch runs through the plain Hugging
Face model with PyTorch hooks on its own modules, and the bridge's logits and requested sites must
agree with it within the dtype's tolerance; otherwise extraction stops naming the model type, the
site and the error. The same hooks decide from the model's structure whether attention and MLP
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


@torch.no_grad()
def reference_sites(
    hf_model: nn.Module, structure: Structure, ids: torch.Tensor, wanted: list[tuple[int, str]]
) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """(logits, the requested sites) of the plain Hugging Face forward on ``ids``."""
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
    try:
        logits = hf_model(ids).logits.float()
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
    return logits, sites


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
        hf_model(ids)
        nudge = attn.register_forward_hook(perturb)
        try:
            hf_model(ids)
        finally:
            nudge.remove()
    finally:
        grab.remove()
    return torch.equal(inputs[0], inputs[1])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return float(
        torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-12)
    )


def compare(
    model_type: str,
    dtype: str,
    expected_logits: torch.Tensor,
    expected_sites: dict,
    got_logits: torch.Tensor,
    got_sites: dict,
) -> dict[str, float]:
    """Relative errors of the wrapper against the model; raises WrapperMismatch beyond tolerance."""
    tol = TOLERANCE[dtype]
    errors = {"logits": relative_error(got_logits, expected_logits)}
    errors.update(
        {
            f"L{layer}/{site}": relative_error(got_sites[(layer, site)], x)
            for (layer, site), x in expected_sites.items()
        }
    )
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
    first batch) agree with the plain model's. Returns (bridge, relative errors)."""
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
    expected_logits, expected_sites = reference_sites(hf_model, structure, ids, wanted)
    try:
        bridge = load_bridge(model_dir, dtype, str(device), hf_model=hf_model)
        with torch.no_grad():
            got_logits = bridge(ids).float()
        got_sites = run_sites(bridge, ids, wanted)
    except Exception as e:  # the wrapper's own failure on an architecture it does not handle
        detail = " ".join(str(e).split())[:160]
        raise ModelError(
            f"{arch.model_type}: transformer_lens's TransformerBridge cannot run this model "
            f"({type(e).__name__}: {detail})"
        ) from None
    return bridge, compare(arch.model_type, dtype, expected_logits, expected_sites, got_logits, got_sites)
