"""Graph scores over a fixed prompt set, for an exported transcoder set or CLT, with circuit-tracer.

Runs inside circuit-tracer's own virtualenv, like ``circuit_tracer_graph.py`` (whose model loading it
shares); ``mtc graph-scores`` starts it there:

    python circuit_tracer_scores.py [--max-feature-nodes N ...] -- MODEL_DIR EXPORT_DIR PROMPTS OUT_JSON

Every prompt is attributed with the same settings (``SETTINGS``, each an option) and its graph
scored: circuit-tracer's ``compute_graph_scores`` (replacement score: the share of the tokens' and
errors' influence on the logits that comes from the tokens, through features; completeness score: the
influence-weighted share of every node's inputs that are not error nodes) on the whole graph, and the
feature and error nodes that ``prune_graph`` keeps at fixed thresholds. OUT_JSON holds the settings,
one record per prompt and the mean of each number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from circuit_tracer_graph import load_replacement

SETTINGS = {
    "max_n_logits": 5,
    "desired_logit_prob": 0.9,
    "batch_size": 128,
    "max_feature_nodes": 1024,
    "node_threshold": 0.8,  # prune_graph's defaults
    "edge_threshold": 0.98,
}
KIND = "mtc graph scores"  # how mtc knows a file it wrote


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def prompt_scores(replacement, prompt: str, settings: dict) -> dict:
    """Attribute ``prompt`` and score its graph, whole and pruned."""
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    start = time.perf_counter()
    graph = attribute(
        prompt,
        replacement,
        max_n_logits=settings["max_n_logits"],
        desired_logit_prob=settings["desired_logit_prob"],
        batch_size=settings["batch_size"],
        max_feature_nodes=settings["max_feature_nodes"],
    )
    replacement_score, completeness_score = compute_graph_scores(graph)
    node_mask = prune_graph(graph, settings["node_threshold"], settings["edge_threshold"]).node_mask
    n_features = len(graph.selected_features)
    n_errors = graph.cfg.n_layers * graph.n_pos  # then the token nodes, then the logits
    return {
        "prompt": prompt,
        "n_tokens": graph.n_pos,
        "active_features": int(graph.active_features.shape[0]),
        "graph_features": n_features,
        "replacement_score": replacement_score,
        "completeness_score": completeness_score,
        "pruned_feature_nodes": int(node_mask[:n_features].sum()),
        "pruned_error_nodes": int(node_mask[n_features : n_features + n_errors].sum()),
        "seconds": time.perf_counter() - start,
    }


MEANS = (
    "replacement_score",
    "completeness_score",
    "pruned_feature_nodes",
    "pruned_error_nodes",
    "active_features",
    "seconds",
)


def graph_scores(replacement, prompts: list[str], settings: dict) -> dict:
    per_prompt = [prompt_scores(replacement, prompt, settings) for prompt in prompts]
    mean = {key: sum(p[key] for p in per_prompt) / len(per_prompt) for key in MEANS}
    return {"kind": KIND, "settings": settings, "mean": mean, "prompts": per_prompt}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("export_dir", type=Path)
    p.add_argument("prompts", type=Path)
    p.add_argument("out_json", type=Path)
    for key, value in SETTINGS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    settings = {key: getattr(args, key) for key in SETTINGS}
    work = args.out_json.parent / (args.out_json.name + ".model")
    start = time.perf_counter()
    replacement, model = load_replacement(args.model_dir, args.export_dir, work)
    load_seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)  # the model is loaded; the export is read lazily, not this
    result = graph_scores(replacement, prompts, settings)
    result.update(export=str(args.export_dir), model=str(args.model_dir), load_seconds=load_seconds)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mean"]))


if __name__ == "__main__":
    main()
