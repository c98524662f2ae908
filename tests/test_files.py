"""utils.files: a file is replaced whole or not at all."""
import os

import pytest

from utils.files import replace_atomically, write_text


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    assert write_text(str(path), "first") == str(path)  # parent folders created
    write_text(str(path), "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.txt"
    write_text(str(path), "old")

    def half_then_fail(f):
        f.write("new, half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        replace_atomically(str(path), half_then_fail, prefix=".tmp_", suffix="_out.txt")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
