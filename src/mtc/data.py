"""Text sources and packing into fixed-size token windows."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtc.config import ConfigError, DatasetConfig, looks_local
from mtc.errors import DatasetError, in_brief

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


PIECE_CHARS = 1 << 20
"""The most text read or tokenized at once (about 70 MB of tokenizer memory). A longer document (a
file with no newline, a huge JSON record) goes on in pieces of at most this many characters, each cut
before a whitespace character, and reading stops once ``n_tokens`` are had. Every document of the
corpora this project uses (Python's pydoc topics, tinyshakespeare, wikitext, english-mix) is shorter,
so their tokens are those of the whole document."""

_CUT_WINDOW = 4096  # how far back from PIECE_CHARS a cut looks for whitespace (a longer "word" is cut)
_LAST_SPACE = re.compile(r"\s\S*\Z")

Piece = tuple[str, bool]
"""Text for the tokenizer, and whether it ends its document (an EOS follows it)."""


def _split(text: str) -> Iterator[str]:
    """``text`` in pieces of at most PIECE_CHARS, cut before whitespace where there is any near the end."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        space = _LAST_SPACE.search(text, max(start + 1, end - _CUT_WINDOW), end)
        cut = space.start() if space else end
        yield text[start:cut]
        start = cut
    yield text[start:]


class _Document:
    """One document's text as it is read, handed on in pieces of at most PIECE_CHARS."""

    def __init__(self):
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> Iterator[Piece]:
        self.parts.append(text)
        self.size += len(text)
        if self.size > PIECE_CHARS:
            pieces = _split("".join(self.parts))
            rest = next(pieces)
            for piece in pieces:
                yield rest, False
                rest = piece
            self.parts, self.size = [rest], len(rest)

    def end(self) -> Iterator[Piece]:
        if self.size:
            yield "".join(self.parts), True
        self.parts, self.size = [], 0


def _whole(texts: Iterator[str]) -> Iterator[Piece]:
    """Documents read whole (JSON records, builtin and hub texts) as pieces."""
    for text in texts:
        if not text:  # an empty document still counts: a seeded shuffle permutes all of them
            yield "", True
            continue
        doc = _Document()
        yield from doc.add(text)
        yield from doc.end()


def _open_text(file: Path):
    return file.open(encoding="utf-8-sig", errors="replace", newline=None)


def _file_pieces(file: Path, text_field: str) -> Iterator[Piece]:
    if file.suffix == ".jsonl":
        return _whole(_jsonl_texts(file, text_field))
    return _text_pieces(file)


def _text_pieces(file: Path) -> Iterator[Piece]:
    """A plain text file as an editor reads it (UTF-8, a leading BOM dropped, CRLF and CR line ends
    read as \\n), in pieces: documents are separated by blank lines, and no more than a line or
    PIECE_CHARS characters is read at once. A few undecodable bytes become U+FFFD; a file that is
    mostly not text (a binary file, another encoding) is refused."""
    _TextCheck.start(file)  # decided before tokenizing: reading may stop before 64k characters
    checker = _TextCheck(file)
    doc = _Document()
    blank: list[str] = []  # the current line, while it holds only whitespace (it may be a blank line)
    in_line = False  # inside a line that holds text
    with _open_text(file) as f:
        while part := f.readline(PIECE_CHARS):
            checker.see(part)
            ends_line = part.endswith("\n")
            if not in_line and not part.strip():
                blank.append(part)
                if ends_line:  # a blank line ends the document
                    blank.clear()
                    yield from doc.end()
                continue
            if blank:
                yield from doc.add("".join(blank))
                blank.clear()
            yield from doc.add(part)
            in_line = not ends_line
    yield from doc.end()
    checker.finish()


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    # Read as a text editor reads it (a leading BOM dropped, CRLF and CR line ends as \n), but
    # strictly: undecodable bytes become lone surrogates here, and the line is refused.
    with file.open(encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
        for n, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DatasetError(
                    f"{file}:{n}: not UTF-8 text (character {e.start} of the line); JSON lines must be UTF-8"
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
    """Counts a text file's characters as they are read (undecodable bytes read as U+FFFD) and refuses
    a file where more than ``MAX_BAD`` of them are undecodable bytes or control characters."""

    MAX_BAD = 0.01
    WINDOW = 65536  # characters read before a decision
    _BAD = re.compile("[\x00-\x08\x0e-\x1f\ufffd]")  # control characters (not whitespace), U+FFFD

    def __init__(self, file: Path):
        self.file, self.chars, self.bad = file, 0, 0

    def see(self, text: str) -> None:
        self.chars += len(text)
        self.bad += len(self._BAD.findall(text))
        if self.chars >= self.WINDOW:
            self.finish()

    @classmethod
    def start(cls, file: Path) -> None:
        """Decide on the file's first WINDOW characters."""
        checker = cls(file)
        with _open_text(file) as f:
            checker.see(f.read(cls.WINDOW))
        checker.finish()

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


def iter_pieces(cfg: DatasetConfig) -> Iterator[Piece]:
    """The configured dataset's text as pieces for the tokenizer, each with whether it ends its
    document: documents in a fixed order (seeded random with ``shuffle_seed``), blank ones left out.
    Read lazily, except that a seeded shuffle of local data reads all of it first."""
    if cfg.shuffle_seed is None or _is_hub(cfg.path):
        pieces = _ordered_pieces(cfg)
    else:
        docs = list(_documents(_ordered_pieces(cfg)))
        order = np.random.default_rng(cfg.shuffle_seed).permutation(len(docs))
        pieces = (piece for i in order for piece in docs[i])
    return _without_blank_documents(pieces)


def iter_texts(cfg: DatasetConfig) -> Iterator[str]:
    """The documents of ``iter_pieces``, each whole (for tests and tools: extraction reads pieces)."""
    for doc in _documents(iter_pieces(cfg)):
        yield "".join(text for text, _ in doc)


def _documents(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    doc: list[Piece] = []
    for piece in pieces:
        doc.append(piece)
        if piece[1]:
            yield doc
            doc = []


def _without_blank_documents(pieces: Iterator[Piece]) -> Iterator[Piece]:
    starts_document = True
    for text, ends in pieces:
        if not (starts_document and ends and (not text or text.isspace())):
            yield text, ends
        starts_document = ends


def sample_text(pieces: Iterator[Piece], chars: int) -> tuple[str, Iterator[Piece]]:
    """The first ``chars`` characters of ``pieces`` (documents joined by a blank line), and the
    pieces again from the start."""
    taken: list[Piece] = []
    size = 0
    for text, ends in pieces:
        taken.append((text, ends))
        size += len(text) + 2 * ends
        if size >= chars:
            break
    sample = "".join(text + "\n\n" * ends for text, ends in taken)[:chars]
    return sample, itertools.chain(taken, pieces)


def _is_hub(path: str) -> bool:
    return not path.startswith("builtin:") and not Path(path).expanduser().exists() and not looks_local(path)


def _ordered_pieces(cfg: DatasetConfig) -> Iterator[Piece]:
    path = cfg.path
    if path.startswith("builtin:"):
        yield from _whole(_builtin_texts(path))
        return
    local = Path(path).expanduser()
    if local.is_file():
        yield from _file_pieces(local, cfg.text_field)
        return
    if local.is_dir():
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DatasetError(f"dataset.split: {cfg.split!r} not in {local}; splits: {list(ds)}")
                ds = ds[cfg.split]
            yield from _whole(_dataset_texts(ds, cfg.text_field, str(local)))
            return
        files = sorted(p for p in local.rglob("*") if p.suffix in (".txt", ".jsonl", ".raw"))
        if not files:
            raise DatasetError(f"dataset.path: {local} holds no .txt, .jsonl or saved dataset")
        for file in files:
            yield from _file_pieces(file, cfg.text_field)
        return
    if looks_local(path):
        raise ConfigError(f"dataset.path: {path!r} does not exist")
    yield from _whole(_hub_texts(cfg))


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
            f"({in_brief(e)}); without network access, "
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


def pack_tokens(pieces: Iterator[Piece], tokenizer, cfg: DatasetConfig, batch_pieces: int = 64) -> np.ndarray:
    """Tokenize text pieces (``iter_pieces``) and pack them into ``[n_sequences, context_size]`` windows.

    Documents are joined with EOS; each window holds ``context_size - 1`` stream tokens after a
    BOS token when ``prepend_bos`` (otherwise ``context_size`` stream tokens). No more than
    ``batch_pieces`` pieces or about PIECE_CHARS characters go to the tokenizer at once, and no more
    is read once the windows are full.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    need = cfg.n_sequences * body
    stream: list[int] = []
    batch: list[Piece] = []
    batch_chars = 0

    def flush() -> None:
        # Whole documents, longer than the model's context: packing cuts them, so no length warning.
        texts = [text for text, _ in batch]
        for ids, (_, ends) in zip(
            tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"], batch
        ):
            stream.extend(ids)
            if ends and eos is not None:
                stream.append(eos)
        batch.clear()

    for text, ends in pieces:
        batch.append((text, ends))
        batch_chars += len(text)
        if len(batch) >= batch_pieces or batch_chars >= PIECE_CHARS:
            flush()
            batch_chars = 0
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
