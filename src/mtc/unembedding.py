"""The model's unembedding, for reading what a decoder direction writes to the logits.

Read from the prepared model's safetensors, without building the model (``mine`` needs nothing
else of it). Kept out of ``models`` so that changing it does not invalidate every activation store
(DVC's extract stage depends on ``models.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtc.models import ModelError, check_weight_files, read_architecture


@dataclass
class Unembedding:
    """The model's readout, read from its safetensors without building the model.

    ``W_U`` [d, vocab] already carries the final norm's per-dimension weight (``diag(g) @ W_U``);
    ``centre`` says the norm is a LayerNorm, which also subtracts the mean over dimensions. What the
    norm leaves out is its division by the residual's scale, a positive factor per token: scores
    ``centre(v) @ W_U`` therefore rank tokens as the model's direct logit effect of direction ``v`` does.
    """

    W_U: torch.Tensor
    centre: bool
    norm: str | None

    @property
    def description(self) -> str:
        norm = (
            f"the final norm's weight ({self.norm}{', centred' if self.centre else ''})"
            if self.norm
            else "no final norm"
        )
        return (
            f"decoder direction (W_dec[f] / target_scale) @ diag(g) @ W_U with {norm}: the direct effect on "
            "the logits up to the norm's positive 1/scale, ignoring all later layers"
        )

    def scores(self, directions_ND: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """Direct logit effect [N, vocab] of residual-stream directions [N, d] (up to a positive scale),
        on the vocabulary's ``tokens`` (all by default)."""
        if self.centre:
            directions_ND = directions_ND - directions_ND.mean(dim=-1, keepdim=True)
        return directions_ND.float() @ self.W_U[:, tokens]


def _read_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors from the model's safetensors files (sharded or not); missing names are left out."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()):
                found[name] = f.get_tensor(name).float()
    return found


READ_ROWS = 16384
"""Rows of the [vocab, d] unembedding read at a time (40 MiB at d = 640)."""


def _read_unembedding(model_dir: Path, names: list[str], gain: torch.Tensor | None) -> torch.Tensor | None:
    """``diag(gain) @ W.T`` [d, vocab] for the first of ``names`` [vocab, d] in the model's safetensors
    (None when none is there), read ``READ_ROWS`` rows at a time into its place: the matrix is held
    once, never beside its transpose."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in set(names) & set(f.keys()) if name not in where})
    name = next((n for n in names if n in where), None)
    if name is None:
        return None
    with safe_open(str(where[name]), framework="pt") as f:
        rows = f.get_slice(name)
        vocab, d = rows.get_shape()
        W_U = torch.empty(d, vocab)
        for start in range(0, vocab, READ_ROWS):
            block_T = rows[start : start + READ_ROWS].float().T
            W_U[:, start : start + READ_ROWS] = block_T if gain is None else gain[:, None] * block_T
    return W_U


def load_unembedding(model_dir: str | Path) -> Unembedding:
    """The unembedding (folded with the final norm's weight) of the model in ``model_dir``.

    Parameter names come from the model class built on the meta device (no memory, no weights), so
    tied embeddings (``lm_head`` saved as ``embed_tokens``) and every architecture's naming work alike.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    read_architecture(model_dir)  # a clear error when there is no model here
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir}: no .safetensors weights; re-run the prepare_model stage")
    check_weight_files(model_dir)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    unembed = model.get_output_embeddings().weight
    unembed_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is unembed]
    # The final norm: the last norm module outside the numbered layers (model.norm, transformer.ln_f, ...).
    norms = [
        (n, m)
        for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and not any(part.isdigit() for part in n.split("."))
    ]
    norm_name, norm = norms[-1] if norms else (None, None)
    norm_weight = f"{norm_name}.weight"
    g = _read_tensors(model_dir, [norm_weight]).get(norm_weight)
    W_U = _read_unembedding(model_dir, unembed_names, None if g is None else _gain(norm, g))
    if W_U is None or (norm is not None and getattr(norm, "weight", None) is not None and g is None):
        # Saved under other names (transformers renames some on save, e.g. GPT-NeoX's embed_out):
        # load the model itself, on the CPU, once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
            )
        norm = model.get_submodule(norm_name) if norm_name else None
        g = norm.weight.detach() if norm is not None and getattr(norm, "weight", None) is not None else None
        W_U = model.get_output_embeddings().weight.detach().float().T.contiguous()  # [d, vocab]
        del model
        if g is not None:
            W_U.mul_(_gain(norm, g)[:, None])
    centre = (
        norm is not None
        and "layernorm" in type(norm).__name__.lower()
        and "rms" not in type(norm).__name__.lower()
    )
    return Unembedding(W_U, centre, norm_name)


def _gain(norm: Any, g: torch.Tensor) -> torch.Tensor:
    """The final norm's per-dimension factor: Gemma's RMSNorm multiplies by (1 + weight); the others by
    weight."""
    return 1 + g.float() if type(norm).__name__.startswith("Gemma") else g.float()
