"""Tiny random models built in the test (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL_DECODER = dict(
    num_hidden_layers=3,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=512,
    max_position_embeddings=64,
)
"""A tiny grouped-query decoder (Llama, Gemma-2, Qwen2, Mistral ... configs take these keys)."""


def tiny_hf_models() -> dict:
    """One tiny random causal LM per architecture family we name hooks for."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=512, n_positions=64)),
        "llama": LlamaForCausalLM(LlamaConfig(**SMALL_DECODER)),
        "gemma2": Gemma2ForCausalLM(Gemma2Config(**SMALL_DECODER, head_dim=8)),
        "neox": GPTNeoXForCausalLM(  # no grouped-query attention in GPT-NeoX
            GPTNeoXConfig(
                **{k: v for k, v in SMALL_DECODER.items() if k != "num_key_value_heads"},
                use_parallel_residual=True,
            )
        ),
    }


def tiny_random_llama_dir(path: Path) -> Path:
    """A random Llama saved with the stories260K-shaped tokenizer it needs (fallback when ../shared is
    absent)."""
    tiny_hf_models()["llama"].save_pretrained(path)
    character_tokenizer().save_pretrained(path)
    return path


def tiny_random_gemma3_dir(path: Path) -> Path:
    """A random Gemma 3 (Gemma3ForCausalLM: norms before and after the MLP, embeddings scaled by
    sqrt(d_model), a sliding-window layer each side of a global one) with RoPE bases other than
    transformers' defaults, saved with the character tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        **SMALL_DECODER,
        head_dim=8,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    Gemma3ForCausalLM(config).save_pretrained(path)
    character_tokenizer().save_pretrained(path)
    return path


def character_tokenizer():
    """One token per printable ASCII character, after ``<unk>``, ``<s>`` (BOS) and ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def copy_data(src: Path, dest: Path) -> Path:
    """A copy of a data directory without the readers' snapshots in it (``.mtc-readers``: this test
    process's own pins on the shared store, which belong to the original)."""
    import shutil

    from mtc.store import READERS_DIR

    return Path(shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(READERS_DIR)))


class LargestLastDim:
    """Context manager recording, for every tensor an operation makes whose last dimension is
    ``size`` (a vocabulary: logits, or a transposed unembedding), the largest number of elements."""

    def __init__(self, size: int):
        self.size, self.largest = size, 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        watch = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == watch.size:
                        watch.largest = max(watch.largest, t.numel())
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
