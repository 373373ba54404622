"""Text sources and packing into fixed-size token windows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtc.config import ConfigError, DatasetConfig, looks_local
from mtc.errors import DatasetError

BUILTIN = {
    # Python's own documentation text (the help() topics), ~465 KB of English in every install.
    "builtin:pydoc-topics": "Python's pydoc_data.topics: the reference documentation behind help()",
}


def _builtin_texts(path: str) -> Iterator[str]:
    if path == "builtin:pydoc-topics":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
        return
    raise ConfigError(f"dataset.path: {path!r} is not a builtin text; builtins: {', '.join(BUILTIN)}")


def _file_texts(file: Path, text_field: str) -> Iterator[str]:
    if file.suffix == ".jsonl":
        yield from _jsonl_texts(file, text_field)
        return
    # Plain text: documents are separated by blank lines. A few undecodable bytes become U+FFFD;
    # a file that is mostly not text (a binary file, another encoding) is refused.
    checker = _TextCheck(file)
    with file.open("rb") as f:
        doc: list[str] = []
        for raw in f:
            line = checker.decode(raw)
            if line.strip():
                doc.append(line)
            elif doc:
                yield "".join(doc)
                doc = []
        if doc:
            yield "".join(doc)
    checker.finish()


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    with file.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{file}:{n}: not UTF-8 text (byte {e.start} of the line); JSON lines must be UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DatasetError(f"{file}:{n}: not a JSON line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DatasetError(f"{file}:{n}: no field {text_field!r} (set dataset.text_field)")
            yield _text_value(record[text_field], f"{file}:{n}", text_field)


def _text_value(value, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: field {text_field!r} is {type(value).__name__} {str(value)[:40]!r}; expected a string"
        )
    return value


class _TextCheck:
    """Decodes a text file's lines as UTF-8 (bad bytes -> U+FFFD) and refuses a file where more
    than ``MAX_BAD`` of the characters are undecodable bytes or control characters."""

    MAX_BAD = 0.01
    _BAD = re.compile("[\x00-\x08\x0e-\x1f\ufffd]")  # control characters (not whitespace), U+FFFD

    def __init__(self, file: Path):
        self.file, self.chars, self.bad = file, 0, 0

    def decode(self, raw: bytes) -> str:
        line = raw.decode("utf-8", errors="replace")
        self.chars += len(line)
        self.bad += len(self._BAD.findall(line))
        if self.chars >= 65536:
            self.finish()
        return line

    def finish(self) -> None:
        if self.chars and self.bad / self.chars > self.MAX_BAD:
            raise DatasetError(
                f"{self.file}: not text ({self.bad} of the first {self.chars} characters are "
                "undecodable bytes or control characters; expected UTF-8 text)"
            )


def _dataset_texts(ds, text_field: str, where: str) -> Iterator[str]:
    if text_field not in ds.column_names:
        raise DatasetError(
            f"{where}: no column {text_field!r} (set dataset.text_field; columns: {ds.column_names})"
        )
    for n, record in enumerate(ds):
        yield _text_value(record[text_field], f"{where}: record {n}", text_field)


def iter_texts(cfg: DatasetConfig) -> Iterator[str]:
    """Documents of the configured dataset, in a fixed order (seeded random with ``shuffle_seed``)."""
    if cfg.shuffle_seed is None or _is_hub(cfg.path):
        yield from _ordered_texts(cfg)
        return
    texts = list(_ordered_texts(cfg))
    for i in np.random.default_rng(cfg.shuffle_seed).permutation(len(texts)):
        yield texts[i]


def _is_hub(path: str) -> bool:
    return not path.startswith("builtin:") and not Path(path).expanduser().exists() and not looks_local(path)


def _ordered_texts(cfg: DatasetConfig) -> Iterator[str]:
    path = cfg.path
    if path.startswith("builtin:"):
        yield from _builtin_texts(path)
        return
    local = Path(path).expanduser()
    if local.is_file():
        yield from _file_texts(local, cfg.text_field)
        return
    if local.is_dir():
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DatasetError(f"dataset.split: {cfg.split!r} not in {local}; splits: {list(ds)}")
                ds = ds[cfg.split]
            yield from _dataset_texts(ds, cfg.text_field, str(local))
            return
        files = sorted(p for p in local.rglob("*") if p.suffix in (".txt", ".jsonl", ".raw"))
        if not files:
            raise DatasetError(f"dataset.path: {local} holds no .txt, .jsonl or saved dataset")
        for file in files:
            yield from _file_texts(file, cfg.text_field)
        return
    if looks_local(path):
        raise ConfigError(f"dataset.path: {path!r} does not exist")
    yield from _hub_texts(cfg)


def _hub_texts(cfg: DatasetConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, split=cfg.split, streaming=True)
        if cfg.shuffle_seed is not None:
            ds = ds.shuffle(seed=cfg.shuffle_seed, buffer_size=10_000)
        iterator = iter(ds)
        first = next(iterator)
    except Exception as e:  # network errors come in many types; the message is what matters
        raise DatasetError(
            f"dataset.path: cannot load hub dataset {cfg.path!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); without network access, "
            "point dataset.path at local .txt/.jsonl files or a saved dataset directory"
        ) from None
    if cfg.text_field not in first:
        raise DatasetError(
            f"dataset.text_field: {cfg.text_field!r} not in {cfg.path} (fields: {list(first)})"
        )
    yield _text_value(first[cfg.text_field], f"{cfg.path}: record 0", cfg.text_field)
    for n, record in enumerate(iterator, 1):
        yield _text_value(record[cfg.text_field], f"{cfg.path}: record {n}", cfg.text_field)


def dataset_label(cfg: DatasetConfig) -> str:
    return BUILTIN.get(cfg.path, cfg.path)


def pack_tokens(texts: Iterator[str], tokenizer, cfg: DatasetConfig, batch_docs: int = 64) -> np.ndarray:
    """Tokenize documents and pack them into ``[n_sequences, context_size]`` windows.

    Documents are joined with EOS; each window holds ``context_size - 1`` stream tokens after a
    BOS token when ``prepend_bos`` (otherwise ``context_size`` stream tokens).
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    need = cfg.n_sequences * body
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        # Whole documents, longer than the model's context: packing cuts them, so no length warning.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        batch.clear()

    for text in texts:
        if text and text.strip():
            batch.append(text)
        if len(batch) >= batch_docs:
            flush()
            if len(stream) >= need:
                break
    if batch:
        flush()
    if len(stream) < need:
        have = len(stream) // body * cfg.context_size
        raise DatasetError(
            f"dataset.n_tokens: asked for {cfg.n_tokens} tokens but {dataset_label(cfg)} gives only "
            f"{have} in windows of {cfg.context_size}; lower dataset.n_tokens to at most {have}"
        )
    windows = np.asarray(stream[:need], dtype=np.int32).reshape(cfg.n_sequences, body)
    if cfg.prepend_bos:
        windows = np.concatenate([np.full((cfg.n_sequences, 1), bos, dtype=np.int32), windows], axis=1)
    return windows
