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
