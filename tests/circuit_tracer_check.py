"""Run inside circuit-tracer's own virtualenv (``.venv-circuit-tracer``; it needs an older transformers
than mtc): load a model directory and an exported transcoder set with circuit-tracer (as ``mtc
attribute`` does), and write what ``tests/test_circuit_tracer.py`` checks to OUT/result.json and
OUT/activations.safetensors, with which circuit-tracer it ran.

    python tests/circuit_tracer_check.py MODEL_DIR SET_DIR OUT "prompt"
    python tests/circuit_tracer_check.py --which    # which circuit-tracer is installed, in one line
"""

import json
import sys
from importlib import metadata
from pathlib import Path

# Per architecture, the block's modules whose input is hook_resid_mid and whose output is
# hook_mlp_out in circuit-tracer's nnsight mapping (circuit_tracer/utils/tl_nnsight_mapping.py).
SITE_MODULES = {
    "LlamaForCausalLM": ("post_attention_layernorm", "mlp"),
    "Gemma3ForCausalLM": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


def installed(dist: str = "circuit-tracer") -> dict:
    """The installed distribution's name, version, where pip installed it from (a direct URL: a git
    URL, a local checkout or file; else an index) and the home its metadata names (Home-page, or the
    Project-URL Homepage), with any Project-URL naming an original repository (circuit-tracer 0.5.0
    on PyPI is a fork's build)."""
    dist_ = metadata.distribution(dist)
    meta = dist_.metadata
    urls = dict(
        (label.strip().lower(), url.strip())
        for label, _, url in (u.partition(",") for u in meta.get_all("Project-URL") or [])
    )
    direct = dist_.read_text("direct_url.json")
    if direct:
        info = json.loads(direct)
        source = info["url"]
        commit = info.get("vcs_info", {}).get("commit_id")
        source += f" (commit {commit})" if commit else ""
    else:
        source = "a package index (no direct URL)"
    return {
        "name": meta["Name"],
        "version": dist_.version,
        "source": source,
        "home": meta.get("Home-page") or urls.get("homepage") or urls.get("repository"),
        "original_repository": urls.get("original repository"),
    }


def which(dist: str = "circuit-tracer") -> str:
    info = installed(dist)
    line = f"{info['name']} {info['version']} installed from {info['source']}; its home page: {info['home']}"
    if info["original_repository"]:
        line += f" (a fork: its metadata names {info['original_repository']} as the original repository)"
    return line


def main(model_dir: str, set_dir: str, out: str, prompt: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "mtc" / "external"))
    import torch
    from circuit_tracer_graph import load_replacement
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out)
    replacement, model = load_replacement(Path(model_dir), Path(set_dir), out_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(model), torch_dtype=torch.float32).eval()
    ids = replacement.tokenizer(prompt, return_tensors="pt").input_ids
    if ids[0, 0] != replacement.tokenizer.bos_token_id:
        ids = torch.cat([torch.tensor([[replacement.tokenizer.bos_token_id]]), ids], dim=1)

    resid_mid, mlp_out, embedded = {}, {}, {}
    hooks = [  # what the embedding adds to the residual stream (Gemma's scaled by sqrt(d_model))
        hf.model.embed_tokens.register_forward_hook(lambda m, a, o: embedded.__setitem__(0, o[0].detach()))
    ]
    read, written = SITE_MODULES[hf.config.architectures[0]]
    for i, layer in enumerate(hf.model.layers):  # what circuit-tracer's mapping hooks
        hooks.append(
            getattr(layer, read).register_forward_pre_hook(
                lambda m, a, i=i: resid_mid.__setitem__(i, a[0][0].detach().clone())
            )
        )
        hooks.append(
            getattr(layer, written).register_forward_hook(
                lambda m, a, o, i=i: mlp_out.__setitem__(i, o[0].detach())
            )
        )
    with torch.no_grad():
        hf_logits = hf(ids).logits[0]
    for hook in hooks:
        hook.remove()

    context = replacement.setup_attribution(ids[0])  # the replacement model, error term on
    layers = range(len(hf.model.layers))
    save_file(
        {
            "resid_mid": torch.stack([resid_mid[i] for i in layers]).contiguous(),
            "mlp_out": torch.stack([mlp_out[i] for i in layers]).contiguous(),
            "error": context.error_vectors.detach().float().contiguous(),
            "ids": ids[0].contiguous(),  # the tokens, and the logits circuit-tracer's model gives them
            "logits": context.logits.reshape(hf_logits.shape).float().contiguous(),
        },
        str(out_dir / "activations.safetensors"),
    )
    result = {
        "max_abs_logit_difference": float(
            (context.logits.reshape(hf_logits.shape).float() - hf_logits).abs().max()
        ),
        "logit_scale": float(hf_logits.abs().max()),
        "max_abs_token_vector_difference": float(
            (context.token_vectors.float() - embedded[0]).abs().max()  # what the token nodes carry
        ),
        "token_vector_scale": float(embedded[0].abs().max()),
        "circuit_tracer": installed(),
    }
    (out_dir / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:] == ["--which"]:
        print(which())
    else:
        main(*sys.argv[1:5])
