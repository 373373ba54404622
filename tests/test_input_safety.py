"""Inputs that used to pass silently or blow up: a model without its tokenizer, a huge one-line text
file, a BOM or CRLF line ends, damaged or pickled weights, a model that needs its own code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml

from mtc import data, models
from mtc.config import DatasetConfig
from tests.conftest import REPO, SHAKESPEARE, STORIES, tiny_params

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/assets/models/stories260K")


def run_stages(root, params: dict, *stages: str):
    """Run the stages in order as DVC does (a subprocess each, stdin closed), stopping at a failure."""
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in stages:
        result = subprocess.run(
            [sys.executable, str(REPO / "stages" / f"{stage}.py")],
            cwd=root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            return result
    return result


@pytest.fixture
def run_here(monkeypatch, capsys):
    """Like run_stages, in this process: the same stage runner and error path, without start-ups."""
    from mtc import pipeline

    def run(root, params: dict, *stages: str):
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.chdir(root)
        for stage in stages:
            try:
                pipeline.run_stage(getattr(pipeline, stage))
            except SystemExit as stop:
                return subprocess.CompletedProcess([], stop.code, "", capsys.readouterr().err)
        output = capsys.readouterr()
        return subprocess.CompletedProcess([], 0, output.out, output.err)

    return run


def one_line(result, message):
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr


def copy_model(tmp_path, leave_out=()):
    model = tmp_path / "model"
    shutil.copytree(STORIES, model, ignore=shutil.ignore_patterns("original", *leave_out))
    model.chmod(0o755)
    for f in model.iterdir():
        f.chmod(0o644)
    return model


# ------------------------------------------------------------------ a tokenizer that cannot read the text
@needs_stories
def test_a_model_without_its_tokenizer_files_is_refused_before_extraction(tmp_path, run_here):
    model = copy_model(tmp_path, leave_out=("tokenizer.json", "tokenizer.model"))
    work = tmp_path / "work"
    work.mkdir()
    params = tiny_params(str(model))
    params["dataset"]["n_tokens"] = 4096  # with no vocabulary, the stream is BOS/EOS: enough of them
    result = run_here(work, params, "prepare_model", "extract")
    one_line(result, "data/models/stories260K: its tokenizer does not read the dataset's text back")
    assert "tokenizer files (tokenizer.json, tokenizer.model) missing" in result.stderr
    assert not (work / "data" / "activations").exists(), "no store"


def byte_level_tokenizer():
    """A byte-level BPE as GPT-2 and SmolLM2 use, trained here (stories260K stands for SentencePiece
    with byte fallback, as Llama and Gemma use)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 50], vocab_size=300)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def samples() -> dict[str, str]:
    from pydoc_data.topics import topics

    found = {"pydoc": "\n\n".join(topics[k] for k in sorted(topics))}
    for name in ("tinyshakespeare/input.txt", "wikitext-2-raw-test/wiki.test.raw"):
        if (path := REPO.parent / "shared" / "assets" / "corpora" / name).is_file():
            found[name] = path.read_text()[:20_000]
    return {name: text[:4096] for name, text in found.items()}


def letterless_tokenizer(tmp_path):
    """A character tokenizer whose vocabulary holds no letters: English is all <unk>."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "1": 3}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def ascii_tokenizer(tmp_path):
    """The tiny random models' tokenizer (tests/helpers.py): one token per printable ASCII character."""
    from tests.helpers import tiny_random_llama_dir

    return models.load_tokenizer(tiny_random_llama_dir(tmp_path / "tiny"))


def test_the_tokenizers_in_use_read_the_text_back(tmp_path):
    tokenizers = {
        "tiny character tokenizer": ascii_tokenizer(tmp_path),
        "byte-level BPE": byte_level_tokenizer(),
    }
    if STORIES.is_dir():
        tokenizers["stories260K"] = models.load_tokenizer(STORIES)
    for name, tokenizer in tokenizers.items():
        for text in [*samples().values(), "Über die Brücke gehen Äpfel und Öl. " * 20]:
            models.check_tokenizer(tokenizer, text, name)  # none refused


@pytest.mark.parametrize(
    "tokenizer, text",
    [
        (letterless_tokenizer, "Once upon a time there was a fox. " * 100),
        (ascii_tokenizer, "这是一个中文句子。" * 300),
    ],
)
def test_a_tokenizer_that_turns_the_text_into_unknowns_is_refused(tmp_path, tokenizer, text):
    with pytest.raises(models.ModelError, match="MODEL: its tokenizer does not read the dataset's text back"):
        models.check_tokenizer(tokenizer(tmp_path), text, "MODEL")


# ------------------------------------------------------------------ a huge file with no newline
def one_line_file(tmp_path, megabytes: int):
    """A text file of ``megabytes`` MB in one line (with a character of two UTF-8 bytes among the words)."""
    words = "the quick brown fox jumps over the lazy café dog and then some "
    text = words * (megabytes * 1_000_000 // len(words.encode()))
    path = tmp_path / "one-line.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_a_file_with_no_newline_is_read_in_bounded_pieces_cut_before_whitespace(tmp_path):
    path, text = one_line_file(tmp_path, 24)
    tracemalloc.start()
    try:
        pieces = data.iter_pieces(DatasetConfig(path=str(path)))
        first = next(pieces)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * data.PIECE_CHARS, f"reading the first piece of a 24 MB line took {peak / 1e6:.0f} MB"
    rest = list(pieces)
    assert all(not ends for _, ends in [first, *rest[:-1]]) and rest[-1][1], "one document, one EOS"
    assert "".join(t for t, _ in [first, *rest]) == text, "nothing lost, no character cut in two"
    assert all(len(t) <= data.PIECE_CHARS for t, _ in [first, *rest])
    assert all(t[0].isspace() for t, _ in rest), "each cut is before whitespace, never inside a word"


class CountingTokenizer:
    """One token per word; counts the characters it is given."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self):
        self.chars = 0

    def __call__(self, texts, add_special_tokens, verbose):
        self.chars += sum(map(len, texts))
        return {"input_ids": [[3 + len(w) for w in t.split()] for t in texts]}


def test_tokenizing_a_file_with_no_newline_stops_once_the_tokens_are_had(tmp_path):
    path, text = one_line_file(tmp_path, 24)
    cfg = DatasetConfig(path=str(path), n_tokens=16384, context_size=64)
    tokenizer = CountingTokenizer()
    windows = data.pack_tokens(data.iter_pieces(cfg), tokenizer, cfg)
    assert tokenizer.chars <= 2 * data.PIECE_CHARS, f"{tokenizer.chars / 1e6:.0f}M characters tokenized"
    expected = [3 + len(w) for w in text.split()[: windows.size - windows.shape[0]]]
    assert windows[:, 1:].ravel().tolist() == expected


def test_a_huge_json_record_is_tokenized_in_pieces_and_keeps_one_eos(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    words = "alpha beta gamma delta " * 500  # 11,500 characters
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": words}) + "\n" + json.dumps({"text": "omega"}) + "\n")
    pieces = list(data.iter_pieces(DatasetConfig(path=str(path))))
    ends = [ends for _, ends in pieces]
    assert len(pieces) > 12 and not any(ends[:-2]) and ends[-2:] == [True, True]
    assert "".join(t for t, _ in pieces[:-1]) == words and max(len(t) for t, _ in pieces) <= 1000
    assert list(data.iter_texts(DatasetConfig(path=str(path)))) == [words, "omega"]


# ------------------------------------------------------------------ BOM and line ends
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_a_bom_at_the_start_of_a_json_lines_file_is_not_text(tmp_path, newline):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + newline.join([b'{"text": "first"}', b'{"text": "second"}', b""]))
    assert list(data.iter_texts(DatasetConfig(path=str(path)))) == ["first", "second"]


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_crlf_and_cr_line_ends_read_as_newlines_and_a_bom_is_dropped(tmp_path, newline):
    text = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n"
    path = tmp_path / "plays.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", newline).encode())
    documents = list(data.iter_texts(DatasetConfig(path=str(path))))
    assert documents == ["First Citizen:\nBefore we proceed.\n", "All:\nSpeak, speak.\n"]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/assets/corpora/tinyshakespeare")
def test_a_text_file_with_crlf_line_ends_gives_the_same_tokens_as_with_lf(tmp_path):
    from tests.helpers import tiny_random_llama_dir

    crlf = tmp_path / "input.txt"
    crlf.write_bytes(SHAKESPEARE.read_bytes()[:200_000].replace(b"\n", b"\r\n"))
    lf = tmp_path / "lf.txt"
    lf.write_bytes(SHAKESPEARE.read_bytes()[:200_000])
    tokenizer = models.load_tokenizer(STORIES if STORIES.is_dir() else tiny_random_llama_dir(tmp_path / "t"))
    cfg = {"n_tokens": 16384, "context_size": 64}
    windows = {
        p.name: data.pack_tokens(
            data.iter_pieces(DatasetConfig(path=str(p), **cfg)), tokenizer, DatasetConfig(**cfg)
        )
        for p in (crlf, lf)
    }
    assert (windows["input.txt"] == windows["lf.txt"]).all()


# ------------------------------------------------------------------ weights and a model's own code
@needs_stories
@pytest.mark.parametrize("damage", ["truncated safetensors", "pickle only"])
def test_damaged_or_pickled_weights_are_refused_in_one_line_naming_the_file(tmp_path, damage, run_here):
    import torch
    from safetensors.torch import load_file

    model = copy_model(tmp_path)
    weights = model / "model.safetensors"
    if damage == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        message = f"{weights}: damaged safetensors file"
    else:
        torch.save(load_file(weights), model / "pytorch_model.bin")
        weights.unlink()
        message = f"{model / 'pytorch_model.bin'}: a pickle checkpoint; mtc never unpickles model weights"
    work = tmp_path / "work"
    work.mkdir()
    one_line(run_here(work, tiny_params(str(model)), "prepare_model"), message)
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"], "nothing written"


@needs_stories
@pytest.mark.parametrize("needing", ["config.json", "tokenizer_config.json"])
def test_a_model_that_needs_its_own_code_is_refused_without_a_prompt(tmp_path, needing):
    model = copy_model(tmp_path)
    config = json.loads((model / needing).read_text())
    if needing == "config.json":
        config.update(model_type="mtc-custom", auto_map={"AutoConfig": "custom.CustomConfig"})
    else:
        config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["custom.Custom", None]})
    (model / needing).write_text(json.dumps(config))
    (model / "custom.py").write_text("raise SystemExit('the model's own code ran')\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_stages(work, tiny_params(str(model)), "prepare_model")
    assert "[y/N]" not in result.stdout + result.stderr, "no prompt"
    one_line(result, f"{model}: loading it needs the model's own Python code")
    assert "mtc never runs a model's own code" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml"], "nothing written"


def test_every_transformers_load_refuses_a_models_own_code():
    """Each from_pretrained in mtc passes trust_remote_code=False (no prompt at a terminal either)."""
    import re

    for path in Path(models.__file__).parent.glob("*.py"):
        for call in re.finditer(r"Auto\w+\.from_(pretrained|config)\(", path.read_text()):
            tail = path.read_text()[call.end() : call.end() + 300]
            args = tail[: tail.index(")\n") if ")\n" in tail else len(tail)]
            assert "trust_remote_code=False" in args, f"{path.name}: {call.group()} without it"
