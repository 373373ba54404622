"""Outputs are written whole to a new directory beside their place and renamed into it: a failure
part-way leaves the earlier output as it was, and nothing beside it."""

from __future__ import annotations

import pytest

from mtc.results import swapped_in_dir


def test_a_failure_while_writing_leaves_the_earlier_output_as_it_was_and_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with swapped_in_dir(out) as new:
            (new / "new.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "earlier"


def test_a_finished_output_replaces_the_earlier_one_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier")
    with swapped_in_dir(out) as new:
        (new / "new.txt").write_text("whole")
        assert [p.name for p in out.iterdir()] == ["old.txt"], "the earlier output stays until the end"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]
