"""An attribution graph of one prompt over an exported transcoder set, with circuit-tracer.

Runs inside circuit-tracer's own virtualenv (``.venv-circuit-tracer``: it needs an older
transformers than mtc), so it imports nothing from mtc; ``mtc attribute`` starts it there:

    python circuit_tracer_graph.py MODEL_DIR SET_DIR OUT "prompt" [--slug S] [--max-feature-nodes N]

It writes, in OUT: ``graph.pt`` (circuit-tracer's full graph), ``graph_files/`` (the pruned graph
and ``graph-metadata.json``, what circuit-tracer's viewer serves: ``circuit-tracer start-server
--graph_file_dir OUT/graph_files``), ``{slug}.png`` (a picture of the pruned graph) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GRAPH_FILES = "graph_files"
SUMMARY = "summary.json"


def readable_model_copy(model_dir: Path, dest: Path) -> Path:
    """transformers 5 writes ``extra_special_tokens`` as a list and names the fast tokenizer class
    ``TokenizersBackend``, neither of which the 4.57 that circuit-tracer needs can read (the token
    ids depend on neither): a copy without the list, naming the class 4.57 knows. Its config.json
    gets the RoPE settings in 4.57's keys (``rope_config_for_4_57``)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("original"))
    model_config = dest / "config.json"
    if model_config.is_file():
        config = json.loads(model_config.read_text())
        model_config.write_text(json.dumps(rope_config_for_4_57(config), indent=2))
    config = dest / "tokenizer_config.json"
    if config.is_file():
        tokenizer_config = json.loads(config.read_text())
        tokenizer_config.pop("extra_special_tokens", None)
        tokenizer_config.pop("backend", None)
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.write_text(json.dumps(tokenizer_config, indent=2))
    return dest


def rope_config_for_4_57(config: dict) -> dict:
    """transformers 5 writes a model's RoPE settings as ``rope_parameters`` (one dict, or one per
    layer type: Gemma 3's ``full_attention`` and ``sliding_attention``), which 4.57 does not read:
    it takes ``rope_theta`` (and Gemma 3's ``rope_local_base_freq``) at their defaults, 10,000 for
    Llama, where SmolLM2's is 100,000. Returns ``config`` with them in 4.57's keys: ``rope_theta``,
    ``rope_local_base_freq``, ``partial_rotary_factor``, and ``rope_scaling`` for a RoPE type other
    than the default."""
    rope = config.pop("rope_parameters", None)
    if rope is None:
        return config
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: one per layer type
        local = rope.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default" or set(local) - {"rope_theta", "rope_type"}:
            raise SystemExit(f"config.json: sliding-window RoPE {local} has no transformers 4.57 form")
        if "rope_theta" in local:
            config["rope_local_base_freq"] = local["rope_theta"]
        rope = rope.get("full_attention", {})
    scaling = dict(rope)
    if "rope_theta" in scaling:
        config["rope_theta"] = scaling.pop("rope_theta")
    if "partial_rotary_factor" in scaling:
        config["partial_rotary_factor"] = scaling.pop("partial_rotary_factor")
    if scaling.get("rope_type", "default") != "default":
        config["rope_scaling"] = scaling
    elif set(scaling) - {"rope_type"}:
        raise SystemExit(f"config.json: RoPE settings {rope} have no transformers 4.57 form")
    return config


def load_replacement(model_dir: Path, set_dir: Path, work: Path):
    """circuit-tracer's ReplacementModel: the model with the set's transcoders (nnsight backend)."""
    from circuit_tracer import ReplacementModel

    model = readable_model_copy(model_dir, work / "model")
    # Decoders in memory: read lazily, a CLT's are fetched from disk row by row while attributing
    # (on SmolLM2 most of a graph's time).
    replacement = ReplacementModel.from_pretrained(
        str(model), str(set_dir.resolve()), backend="nnsight", lazy_decoder=False
    )
    embedding_outputs_as_token_vectors(replacement)
    return replacement, model


def embedding_outputs_as_token_vectors(replacement) -> None:
    """Make a token node's vector what the embedding module adds to the residual stream.

    circuit-tracer 0.5's nnsight backend reads the gradient at the embedding module's output but
    takes the token vectors from the embedding matrix (``setup_attribution`` in
    ``replacement_model_nnsight.py``: ``self.embed_weight[tokens]``). For Llama the two are one; a
    Gemma embedding module multiplies its rows by sqrt(d_model) (``embed_scale``: 25.3 for
    Gemma-3-270M), so every edge out of a token node, and the replacement score with them, came out
    that many times too small. This wraps the model's ``setup_attribution`` to put the module's own
    output in their place (the TransformerLens backend, which folds the scale into ``W_E``, agrees)."""
    import torch

    embedding = replacement.embed_location._module  # the module, not nnsight's proxy of it
    setup = replacement.setup_attribution

    def setup_attribution(inputs):
        context = setup(inputs)
        tokens = replacement.ensure_tokenized(inputs) if isinstance(inputs, str) else inputs.squeeze()
        with torch.no_grad():
            vectors = embedding(tokens.to(context.token_vectors.device))
        context.token_vectors = vectors.to(context.token_vectors.dtype).detach()
        return context

    replacement.setup_attribution = setup_attribution


def attribution_graph(replacement, prompt: str, out: Path, slug: str, max_feature_nodes: int) -> dict:
    """Attribute ``prompt``, save the graph and the viewer's files; returns a summary."""
    from circuit_tracer import attribute
    from circuit_tracer.utils.create_graph_files import create_graph_files

    graph = attribute(
        prompt,
        replacement,
        max_n_logits=5,
        desired_logit_prob=0.9,
        batch_size=64,
        max_feature_nodes=max_feature_nodes,
    )
    graph.to_pt(str(out / "graph.pt"))
    create_graph_files(graph, slug=slug, output_path=str(out / GRAPH_FILES), scan=graph.scan or slug)
    pruned = json.loads((out / GRAPH_FILES / f"{slug}.json").read_text())
    picture = draw(pruned, out / f"{slug}.png")
    kinds: dict[str, int] = {}
    for node in pruned["nodes"]:
        kinds[node["feature_type"]] = kinds.get(node["feature_type"], 0) + 1
    return {
        "prompt": prompt,
        "prompt_tokens": pruned["metadata"]["prompt_tokens"],
        "active_features": int(graph.active_features.shape[0]),
        "pruned_nodes": kinds,
        "pruned_links": len(pruned["links"]),
        "graph_json": str(out / GRAPH_FILES / f"{slug}.json"),
        "picture": str(picture),
    }


def draw(pruned: dict, path: Path, max_links: int = 1500) -> Path:
    """The pruned graph as circuit-tracer's viewer lays it out: token position across, layer up
    (embeddings at the bottom, logits on top); edges coloured by sign, opacity by weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = pruned["nodes"]
    top = max(int(n["layer"]) for n in nodes if n["layer"] != "E")

    def height(node: dict) -> float:
        return -1.0 if node["layer"] == "E" else float(node["layer"])

    # Nodes sharing a (position, layer) cell are spread across it.
    cells: dict[tuple, list[dict]] = {}
    for node in nodes:
        cells.setdefault((node["ctx_idx"], height(node)), []).append(node)
    where = {}
    for (ctx, h), members in cells.items():
        for i, node in enumerate(members):
            where[node["node_id"]] = (ctx + (i + 1) / (len(members) + 1) - 0.5, h)

    tokens = pruned["metadata"]["prompt_tokens"]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(tokens)), 0.3 * (top + 3) + 2))
    links = sorted(pruned["links"], key=lambda lk: abs(lk["weight"]))[-max_links:]  # the strongest
    biggest = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    for link in links:
        if link["source"] in where and link["target"] in where:
            (x0, y0), (x1, y1) = where[link["source"]], where[link["target"]]
            ax.plot(
                [x0, x1],
                [y0, y1],
                color="tab:blue" if link["weight"] > 0 else "tab:red",
                alpha=min(1.0, 0.05 + abs(link["weight"]) / biggest),
                linewidth=0.6,
                zorder=1,
            )
    style = {
        "cross layer transcoder": ("o", "tab:orange", "feature"),
        "mlp reconstruction error": ("s", "tab:gray", "error"),
        "embedding": ("D", "tab:green", "embedding"),
        "logit": ("^", "tab:purple", "logit"),
    }
    for kind, (marker, colour, label) in style.items():
        points = [where[n["node_id"]] for n in nodes if n["feature_type"] == kind]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, marker=marker, color=colour, s=22, label=label, zorder=2, edgecolors="none")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(-1, top + 1, max(1, (top + 1) // 10)))
    ax.set_ylabel("layer (-1: embeddings; top: logits)")
    logits = ", ".join(n["clerp"] for n in nodes if n["feature_type"] == "logit")
    ax.set_title(
        f"{pruned['metadata']['prompt']!r}\n{logits}\n{len(links)} strongest of "
        f"{len(pruned['links'])} links (blue: excitatory, red: inhibitory)",
        fontsize=8,
    )
    ax.legend(loc="upper left", fontsize=7, ncol=4, frameon=False, bbox_to_anchor=(0, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("set_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("prompt")
    p.add_argument("--slug", default="graph")
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    replacement, _ = load_replacement(args.model_dir, args.set_dir, args.out)
    summary = attribution_graph(replacement, args.prompt, args.out, args.slug, args.max_feature_nodes)
    shutil.rmtree(args.out / "model", ignore_errors=True)
    (args.out / SUMMARY).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
