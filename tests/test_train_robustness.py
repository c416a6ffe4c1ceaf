"""Issue #14: nothing trained is lost to a bad output path or a failing save, a damaged state is refused before it is
used, and images corrupted behind a valid header are found up front or skipped."""

from __future__ import annotations

import re
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import flux_train_network as cli
from test_train_network import run_trainer, train_args
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("robust")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=2, size=32)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# --- defect 2: output paths -------------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_fails_before_models_load(setup, tmp_path, capsys, monkeypatch):
    from library.training import setup as train_setup

    monkeypatch.setattr(train_setup, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    out = tmp_path / "out"
    out.write_text("a file the user made")
    assert cli.main(train_args(setup, out)) == 2
    line = error_line(capsys)
    assert f"--output_dir {out}: is a file, expected a folder" in line
    assert out.read_text() == "a file the user made"


@pytest.mark.parametrize("option", ["--logging_dir", "--sample_prompts"])
def test_logging_and_sample_folders_are_checked_up_front(setup, tmp_path, capsys, monkeypatch, option):
    from library.training import setup as train_setup

    monkeypatch.setattr(train_setup, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    if option == "--logging_dir":
        extra, named = ["--logging_dir", str(blocker / "logs")], f"--logging_dir {blocker / 'logs'}"
    else:
        prompts = tmp_path / "p.txt"
        prompts.write_text("a cat --w 32 --h 32 --s 1\n")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "sample").write_text("x")
        extra, named = ["--sample_prompts", str(prompts)], f"the sample folder {tmp_path / 'out' / 'sample'}"
    assert cli.main(train_args(setup, tmp_path / "out", *extra)) == 2
    line = error_line(capsys)
    assert named in line and "is a file" in line


def test_cache_to_disk_needs_writable_image_folders(setup, tmp_path, capsys, monkeypatch):
    from library.training import outputs

    real = outputs.check_writable_folder

    def read_only_images(path, what):
        if "image folder" in what:
            raise outputs.TrainingError(f"{what} {path}: not writable (Read-only file system); expected a folder "
                                        "this user can write to")
        real(path, what)

    monkeypatch.setattr(outputs, "check_writable_folder", read_only_images)
    assert cli.main(train_args(setup, tmp_path / "out", "--cache_latents_to_disk")) == 2
    assert "--cache_latents_to_disk: the image folder" in error_line(capsys)


def test_not_writable_and_full_disk_are_named(tmp_path, monkeypatch):
    from library.training import outputs

    with pytest.raises(outputs.TrainingError, match="--output_dir: not given"):
        outputs.check_output_paths(type("Args", (), {"output_dir": None})())

    def no_write(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_write)
    with pytest.raises(outputs.TrainingError, match=r"--output_dir .*: not writable \(Permission denied\)"):
        outputs.check_writable_folder(tmp_path / "o", "--output_dir")
    monkeypatch.undo()
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(outputs.TrainingError, match=r"--output_dir .*: the disk is full \(100 bytes free\)"):
        outputs.check_writable_folder(tmp_path / "o", "--output_dir")


def _fail_in(folder):
    """A save_weights / save_state stand-in that fails with ENOSPC for paths inside `folder`."""
    def check(path):
        if str(path).startswith(str(folder)):
            raise OSError(28, "No space left on device")
    return check


def test_final_save_that_fails_keeps_the_weights_in_a_rescue_file(setup, tmp_path, capsys, monkeypatch):
    from library.training.recipes.lora import LoRATrainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    original, fail = LoRATrainer.save_weights, _fail_in(out)

    def full_disk(self, path, *a, **k):
        fail(path)
        original(self, path, *a, **k)

    monkeypatch.setattr(LoRATrainer, "save_weights", full_disk)
    assert cli.main(train_args(setup, out, "--output_name", "mine", "--max_train_steps", "2")) == 2
    line = error_line(capsys)
    rescued = list((tmp_path / "tmp").glob("mine-rescued-*.safetensors"))
    assert len(rescued) == 1 and f"could not write {out / 'mine.safetensors'} (No space left on device)" in line
    assert f"the weights are saved in {rescued[0]} instead" in line
    assert any(k.endswith("lora_down.weight") for k in load_file(str(rescued[0])))


def test_checkpoint_and_state_that_fail_mid_run_stop_with_both_rescued(setup, tmp_path, capsys, monkeypatch):
    from library.training.loop import Trainer
    from library.training.recipes.lora import LoRATrainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    fail = _fail_in(out)
    original_weights, original_state = LoRATrainer.save_weights, Trainer._write_state

    def full_disk_weights(self, path, *a, **k):
        fail(path)
        original_weights(self, path, *a, **k)

    def full_disk_state(self, folder):
        fail(folder)
        original_state(self, folder)

    monkeypatch.setattr(LoRATrainer, "save_weights", full_disk_weights)
    monkeypatch.setattr(Trainer, "_write_state", full_disk_state)
    argv = train_args(setup, out, "--output_name", "m", "--save_every_n_steps", "2", "--save_state")
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "saving at step 2 failed, training stopped" in line
    state = next((tmp_path / "tmp").glob("m-step00000002-state-rescued-*"))
    assert f"resume with --resume {state}" in line and (state / "train_state.json").exists()
    assert not (out / "m.safetensors").exists()
    # the rescued state resumes into a working folder
    monkeypatch.undo()
    _, code = run_trainer(train_args(setup, tmp_path / "fixed", "--output_name", "m", "--resume", str(state)))
    assert code == 0 and (tmp_path / "fixed" / "m.safetensors").exists()


# --- defect 4: damaged states -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_state(setup, tmp_path_factory):
    """A full 6-step run with a state at step 3 (the reference for resumes)."""
    out = tmp_path_factory.mktemp("state")
    _, code = run_trainer(train_args(setup, out, "--save_every_n_steps", "3", "--save_state", "--output_name", "r"))
    assert code == 0
    return out


def damaged_copy(saved_state, tmp_path, damage):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(saved_state / "r-step00000003-state", state)
    damage(state)
    return state


def resume_args(setup, tmp_path, state, *extra):
    return train_args(setup, tmp_path / "out", "--save_every_n_steps", "3", "--save_state", "--output_name", "r",
                      "--resume", str(state), *extra)


def test_empty_random_states_stop_the_resume_unless_inexact(setup, saved_state, tmp_path, capsys, caplog):
    state = damaged_copy(saved_state, tmp_path, lambda s: (s / "random_states_0.pkl").write_bytes(b""))
    assert cli.main(resume_args(setup, tmp_path, state)) == 2
    line = error_line(capsys)
    assert f"{state / 'random_states_0.pkl'}: the random states cannot be restored" in line
    assert "--resume_inexact" in line and not (tmp_path / "out" / "r.safetensors").exists()
    assert cli.main(resume_args(setup, tmp_path, state, "--resume_inexact")) == 0
    assert "going on with fresh random states" in caplog.text
    assert (tmp_path / "out" / "r.safetensors").exists()


def test_truncated_optimizer_state_is_one_line(setup, saved_state, tmp_path, capsys):
    def cut(s):
        data = (s / "optimizer.bin").read_bytes()
        (s / "optimizer.bin").write_bytes(data[: len(data) // 2])

    state = damaged_copy(saved_state, tmp_path, cut)
    assert cli.main(resume_args(setup, tmp_path, state)) == 2
    assert f"{state / 'optimizer.bin'}: damaged" in error_line(capsys)


@pytest.mark.parametrize("name", ["scheduler.bin", "trainable_weights.safetensors", "train_state.json"])
def test_missing_or_damaged_state_files_are_named(setup, saved_state, tmp_path, capsys, name):
    def damage(s):
        if name == "trainable_weights.safetensors":
            data = (s / name).read_bytes()
            (s / name).write_bytes(data[:-100])
        elif name == "train_state.json":
            (s / name).write_text("{")
        else:
            (s / name).unlink()

    state = damaged_copy(saved_state, tmp_path, damage)
    assert cli.main(resume_args(setup, tmp_path, state)) == 2
    line = error_line(capsys)
    assert str(state / name) in line and ("missing" in line or "damaged" in line or "truncated" in line)


def test_resume_with_another_network_dim_names_the_setting(setup, saved_state, tmp_path, capsys):
    argv = resume_args(setup, tmp_path, saved_state / "r-step00000003-state")
    argv[argv.index("--network_dim") + 1] = "8"
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "trainable_weights.safetensors: " in line and "this run's has [8, " in line
    assert "saved with --network_dim 4" in line and "this run has 8" in line


def test_exact_resume_of_an_intact_state_is_unchanged(setup, saved_state, tmp_path):
    state = damaged_copy(saved_state, tmp_path, lambda s: None)
    _, code = run_trainer(resume_args(setup, tmp_path, state))
    assert code == 0
    a = load_file(str(saved_state / "r.safetensors"))
    b = load_file(str(tmp_path / "out" / "r.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- defect 5: data corrupted behind a valid header ---------------------------------------------------------------

def corrupt_idat(path):
    """Flip bytes in the middle of a PNG's first IDAT chunk and fix its CRC: every length, CRC and end marker stays
    valid, so only a full decode notices."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    pos = 8
    while True:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IDAT":
            start = pos + 8
            for i in range(start + length // 2, min(start + length // 2 + 32, start + length)):
                data[i] ^= 0x5A
            data[start + length:start + length + 4] = struct.pack(">I", zlib.crc32(data[pos + 4:start + length]))
            break
        pos += 12 + length
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupt_dataset(tmp_path):
    toml = make_demo_dataset(tmp_path / "data", count=4, size=32)
    bad = sorted((tmp_path / "data" / "images").glob("*.png"))[1]
    corrupt_idat(bad)
    return toml, bad


def test_corrupt_png_passes_the_header_probe_but_not_a_decode(corrupt_dataset):
    from library.data.images import BadImageError, load_image, probe_image, verify_images

    _, bad = corrupt_dataset
    assert probe_image(bad).size == (32, 32)
    with pytest.raises(BadImageError, match="cannot decode image"):
        load_image(bad)
    assert [b.path for b in verify_images(sorted(bad.parent.glob("*.png")))] == [bad]


def test_inspect_dataset_verify_images_reports_it(corrupt_dataset, capsys):
    from tools.inspect_dataset import main

    toml, bad = corrupt_dataset
    assert main(["--dataset_config", str(toml)]) == 0
    capsys.readouterr()
    assert main(["--dataset_config", str(toml), "--verify_images"]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and f"{bad}: cannot decode image" in err


def test_trainer_verify_images_refuses_it_before_models_load(setup, corrupt_dataset, tmp_path, capsys, monkeypatch):
    from library.training import setup as train_setup

    monkeypatch.setattr(train_setup, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    toml, bad = corrupt_dataset
    assert cli.main(train_args((setup[0], toml), tmp_path / "out", "--verify_images")) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {bad}: cannot decode image")


def test_decode_failure_mid_run_is_one_line_naming_the_file(setup, corrupt_dataset, tmp_path, capsys):
    toml, bad = corrupt_dataset
    assert cli.main(train_args((setup[0], toml), tmp_path / "out", "--max_train_steps", "4")) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {bad}: cannot decode image") and "--skip_bad_images" in line


def test_skip_bad_images_skips_a_decode_failure_mid_run(setup, corrupt_dataset, tmp_path, caplog):
    toml, bad = corrupt_dataset
    argv = train_args((setup[0], toml), tmp_path / "a", "--skip_bad_images", "--max_train_steps", "8",
                      "--output_name", "s")
    trainer, code = run_trainer(argv)
    assert code == 0 and (tmp_path / "a" / "s.safetensors").exists()
    assert list(trainer.skipped_images) == [str(bad)]
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"skipping image {bad}")]
    assert len(named) == 1  # logged once, though the image comes up every epoch
    assert any("image(s) could not be decoded and were skipped (1 in this run)" in r.getMessage()
               for r in caplog.records)
    # the substitution is a function of the seed and the files: a second run trains the same weights
    run_trainer(train_args((setup[0], toml), tmp_path / "b", "--skip_bad_images", "--max_train_steps", "8",
                           "--output_name", "s"))
    a, b = load_file(str(tmp_path / "a" / "s.safetensors")), load_file(str(tmp_path / "b" / "s.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skip_bad_images_resume_is_exact(setup, corrupt_dataset, tmp_path):
    toml, _ = corrupt_dataset
    common = ("--skip_bad_images", "--max_train_steps", "8", "--output_name", "s", "--save_every_n_steps", "3",
              "--save_state")
    run_trainer(train_args((setup[0], toml), tmp_path / "full", *common))
    _, code = run_trainer(train_args((setup[0], toml), tmp_path / "resumed", *common, "--resume",
                                     str(tmp_path / "full" / "s-step00000003-state")))
    assert code == 0
    a = load_file(str(tmp_path / "full" / "s.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "s.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_worker_reraised_bad_image_error_keeps_one_line():
    from library.data.images import BadImageError

    message = ("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nlibrary.data.images.BadImageError: /d/a.png: cannot decode image (x)\n')
    e = BadImageError(message)
    assert str(e) == "/d/a.png: cannot decode image (x)" and e.reason == "cannot decode image (x)"
