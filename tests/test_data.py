"""Reading documents: their order, and a seeded shuffle before packing."""

from __future__ import annotations

import json

from mtc.config import DatasetConfig
from mtc.data import iter_texts


def _corpus(tmp_path, n=50):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f"document {i}", "source": "a" if i < n // 2 else "b"}) + "\n"
            for i in range(n)
        )
    )
    return str(path)


def test_documents_come_in_file_order_unless_a_shuffle_seed_is_given(tmp_path):
    path = _corpus(tmp_path)
    ordered = list(iter_texts(DatasetConfig(path=path)))
    assert ordered == [f"document {i}" for i in range(50)]
    shuffled = list(iter_texts(DatasetConfig(path=path, shuffle_seed=0)))
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered
    assert list(iter_texts(DatasetConfig(path=path, shuffle_seed=0))) == shuffled, (
        "the same seed, the same order"
    )
    assert list(iter_texts(DatasetConfig(path=path, shuffle_seed=1))) != shuffled
    # a source-sorted corpus: its last tenth (what would be held out) mixes both sources once shuffled
    assert {int(t.split()[1]) < 25 for t in shuffled[-10:]} == {True, False}
