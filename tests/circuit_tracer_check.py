"""Run inside circuit-tracer's own virtualenv (``.venv-circuit-tracer``; it needs an older transformers
than mtc): load a model directory and an exported transcoder set with circuit-tracer, and write what
``tests/test_circuit_tracer.py`` checks to OUT/result.json and OUT/activations.safetensors.

    python tests/circuit_tracer_check.py MODEL_DIR SET_DIR OUT "prompt"
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def readable_model_copy(model_dir: Path, dest: Path) -> Path:
    """transformers 5 writes ``extra_special_tokens`` as a list, which the 4.57 that circuit-tracer
    needs cannot read (the token ids do not depend on it): a copy without it."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("original"))
    config = dest / "tokenizer_config.json"
    if config.is_file():
        tokenizer_config = json.loads(config.read_text())
        tokenizer_config.pop("extra_special_tokens", None)
        tokenizer_config.pop("backend", None)
        config.write_text(json.dumps(tokenizer_config, indent=2))
    return dest


def main(model_dir: str, set_dir: str, out: str, prompt: str) -> None:
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from transformers import AutoModelForCausalLM

    out_dir = Path(out)
    model = readable_model_copy(Path(model_dir), out_dir / "model")
    replacement = ReplacementModel.from_pretrained(
        str(model), str(Path(set_dir).resolve()), backend="nnsight"
    )
    hf = AutoModelForCausalLM.from_pretrained(str(model), torch_dtype=torch.float32).eval()
    ids = replacement.tokenizer(prompt, return_tensors="pt").input_ids
    if ids[0, 0] != replacement.tokenizer.bos_token_id:
        ids = torch.cat([torch.tensor([[replacement.tokenizer.bos_token_id]]), ids], dim=1)

    resid_mid, mlp_out, hooks = {}, {}, []
    for i, layer in enumerate(hf.model.layers):  # what circuit-tracer's Llama mapping hooks
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: resid_mid.__setitem__(i, a[0][0].detach().clone())
            )
        )
        hooks.append(
            layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp_out.__setitem__(i, o[0].detach()))
        )
    with torch.no_grad():
        hf_logits = hf(ids).logits[0]
    for hook in hooks:
        hook.remove()

    context = replacement.setup_attribution(ids[0])  # the replacement model, error term on
    layers = range(len(hf.model.layers))
    graph = attribute(prompt, replacement, max_n_logits=5, desired_logit_prob=0.9, batch_size=64)
    graph.to_pt(str(out_dir / "graph.pt"))
    create_graph_files(graph, slug="check", output_path=str(out_dir / "graph"), scan="check")
    n_features = int(graph.active_features.shape[0])
    save_file(
        {
            "resid_mid": torch.stack([resid_mid[i] for i in layers]).contiguous(),
            "mlp_out": torch.stack([mlp_out[i] for i in layers]).contiguous(),
            "error": context.error_vectors.detach().float().contiguous(),
        },
        str(out_dir / "activations.safetensors"),
    )
    result = {
        "max_abs_logit_difference": float(
            (context.logits.reshape(hf_logits.shape).float() - hf_logits).abs().max()
        ),
        "logit_scale": float(hf_logits.abs().max()),
        "feature_nodes": n_features,
        "graph_json": str(out_dir / "graph" / "check.json"),
    }
    (out_dir / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
