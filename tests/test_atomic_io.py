"""Atomic writes keep the old file when a write fails and leave no temporary files behind."""

import os

import pytest

from library.formats.atomic_io import atomic_write


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "out" / "file.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("one"))
    assert target.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600

    def failing(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]
