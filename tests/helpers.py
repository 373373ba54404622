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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_hf_models()["llama"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


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
