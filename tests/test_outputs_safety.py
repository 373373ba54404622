"""Outputs are written whole to a new directory beside their place and renamed into it: a failure
part-way leaves the earlier output as it was, and nothing beside it."""

from __future__ import annotations

import pytest

from mtc.results import swapped_in_dir


def beside(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_failure_while_writing_leaves_the_earlier_output_as_it_was_and_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with swapped_in_dir(out) as new:
            (new / "new.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert beside(tmp_path) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "earlier"


def test_a_finished_output_replaces_the_earlier_one_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier")
    with swapped_in_dir(out) as new:
        (new / "new.txt").write_text("whole")
        assert [p.name for p in out.iterdir()] == ["old.txt"], "the earlier output stays until the end"
    assert beside(tmp_path) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_a_writer_killed_mid_swap_is_finished_by_the_next_one(tmp_path):
    """Killed after moving the earlier output aside, before renaming the new one in: the next writer
    puts the earlier output back (then fails here) and removes the killed one's half-written copy."""
    out = tmp_path / "out"
    aside, half = tmp_path / ".out.4242.0123abcd.old", tmp_path / ".out.4242.89abcdef.tmp"
    aside.mkdir()
    (aside / "old.txt").write_text("earlier")
    half.mkdir()
    (half / "new.txt").write_text("half")
    (tmp_path / ".out.notours.tmp").mkdir()  # not a name swapped_in_dir makes: left alone
    with pytest.raises(RuntimeError, match="disk on fire"):
        with swapped_in_dir(out):
            raise RuntimeError("disk on fire")
    assert beside(tmp_path) == [".out.notours.tmp", "out"]
    assert (out / "old.txt").read_text() == "earlier"


def test_a_second_writer_in_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    from mtc.errors import LockedError

    with swapped_in_dir(tmp_path / "out") as new:
        (new / "a.txt").write_text("first")
        with pytest.raises(LockedError, match="another mtc process is writing an output here"):
            with swapped_in_dir(tmp_path / "other"):
                pass
    assert beside(tmp_path) == ["out"]
