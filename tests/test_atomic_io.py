"""Atomic writes keep the old file when a write fails and leave no temporary files behind."""

import os

import pytest

from library.formats.atomic_io import TEMP_NAME, atomic_write, remove_stale_temporaries


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


def dead_pid() -> int:
    """The id of a process that has ended."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_names_are_ours_and_recognisable(tmp_path):
    seen = []
    atomic_write(tmp_path / "last.safetensors", lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w")))
    match = TEMP_NAME.fullmatch(seen[0])
    assert seen[0].startswith(".last.safetensors.flux-tmp-") and match and int(match["pid"]) == os.getpid()


def test_stale_temporaries_of_ours_are_removed_and_nothing_else(tmp_path, caplog):
    dead, alive = dead_pid(), os.getppid()  # pytest's parent process is running
    (tmp_path / "sample").mkdir()
    (tmp_path / "a-state" / "deeper").mkdir(parents=True)
    stale = [tmp_path / f".last.safetensors.flux-tmp-{dead}-ab_12cde.tmp",
             tmp_path / "sample" / f".x_000001.png.flux-tmp-{dead}-abcdefgh.png",
             tmp_path / "a-state" / f".train_state.json.flux-tmp-{dead}-zzzzzzzz.tmp"]
    kept = [tmp_path / f".last.safetensors.flux-tmp-{alive}-abcdefgh.tmp",  # another run may be saving
            tmp_path / f".last.safetensors.flux-tmp-{os.getpid()}-abcdefgh.tmp",
            tmp_path / ".last.safetensors.abcdefgh.tmp",  # mkstemp's generic name: not recognisably ours
            tmp_path / f"last.safetensors.flux-tmp-{dead}-abcdefgh.tmp",  # not hidden
            tmp_path / f".last.safetensors.flux-tmp-{dead}-abcdefghi.tmp",  # 9 random characters
            tmp_path / "a-state" / "deeper" / f".x.flux-tmp-{dead}-abcdefgh.tmp",  # too deep
            tmp_path / "last.safetensors"]
    for p in stale + kept:
        p.write_text("x")
    (tmp_path / f".dir.flux-tmp-{dead}-abcdefgh.tmp").mkdir()  # a folder, not our file
    with caplog.at_level("INFO"):
        removed = remove_stale_temporaries(tmp_path, subfolders=True)
    assert sorted(removed) == sorted(stale) and not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and (tmp_path / f".dir.flux-tmp-{dead}-abcdefgh.tmp").is_dir()
    assert f"removed 3 temporary file(s) left by an interrupted save in {tmp_path}" in caplog.text
    # without subfolders only the folder itself; a missing folder is no error
    (tmp_path / "sample" / stale[1].name).write_text("x")
    assert remove_stale_temporaries(tmp_path) == [] and remove_stale_temporaries(tmp_path / "nope") == []
