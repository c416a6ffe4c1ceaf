"""Hugging Face Hub options through the LoRA trainer, against a stand-in HfApi (nothing leaves the machine)."""

from __future__ import annotations

import shutil
from pathlib import Path
from functools import partial

import huggingface_hub
import pytest

import cli_runs
import flux_train_network as cli
from cli_runs import run_args
from library.training.hub import HubError, parse_hub_resume
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

run_trainer = partial(cli_runs.run_trainer, "network")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    return make_tiny_models(base / "models"), make_demo_dataset(base / "data", count=2, size=32)


def train_args(setup, out, *extra):
    return [*run_args(*setup, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-3", "--max_train_steps", "4", "--network_train_unet_only", *extra]


class FakeHub:
    """Records what an HfApi would have been asked to do; uploads keep the bytes they read."""

    def __init__(self, fail_files=()):
        self.calls, self.files, self.folders, self.fail_files = [], {}, {}, set(fail_files)

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, repo_type, private, token))

            def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type):
                if path_in_repo.rsplit("/", 1)[-1] in hub.fail_files:
                    raise ConnectionError("network down")
                if hasattr(path_or_fileobj, "read"):
                    data = path_or_fileobj.read()
                else:
                    data = Path(path_or_fileobj).read_bytes()
                hub.files[path_in_repo] = data
                hub.calls.append(("upload_file", repo_id, path_in_repo))

            def upload_folder(self, folder_path, path_in_repo, repo_id, repo_type):
                hub.folders[path_in_repo] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
                hub.calls.append(("upload_folder", repo_id, path_in_repo))

        return Api()


def test_checkpoints_and_states_are_uploaded_async_safe_with_save_last_n(setup, tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    out = tmp_path / "out"
    _, code = run_trainer(train_args(setup, out, "--output_name", "h", "--save_every_n_steps", "1",
                                     "--save_last_n_steps", "1", "--save_state", "--save_state_to_huggingface",
                                     "--huggingface_repo_id", "me/flux-lora", "--huggingface_path_in_repo", "runs/a",
                                     "--huggingface_token", "tok", "--huggingface_repo_visibility", "public",
                                     "--async_upload"))
    assert code == 0
    assert hub.calls[0] == ("create_repo", "me/flux-lora", "model", False, "tok")
    # every step checkpoint was uploaded although --save_last_n_steps deleted most of them locally meanwhile
    assert sorted(hub.files) == ["runs/a/h-step00000001.safetensors", "runs/a/h-step00000002.safetensors",
                                 "runs/a/h-step00000003.safetensors", "runs/a/h.safetensors"]
    assert hub.files["runs/a/h.safetensors"] == (out / "h.safetensors").read_bytes()
    assert "runs/a/h-state" in hub.folders and "train_state.json" in hub.folders["runs/a/h-state"]


def test_a_failed_upload_keeps_training_and_the_local_file(setup, tmp_path, monkeypatch, caplog):
    hub = FakeHub(fail_files={"h.safetensors"})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    _, code = run_trainer(train_args(setup, tmp_path, "--output_name", "h", "--huggingface_repo_id", "me/r"))
    assert code == 0 and (tmp_path / "h.safetensors").exists()
    assert "uploading" in caplog.text and "failed (the local copy is kept): network down" in caplog.text


def test_resume_from_huggingface_downloads_the_state(setup, tmp_path, monkeypatch):
    _, code = run_trainer(train_args(setup, tmp_path / "first", "--output_name", "r", "--save_every_n_steps", "2",
                                     "--save_state"))
    assert code == 0
    asked = []

    def snapshot_download(repo_id, repo_type=None, revision=None, allow_patterns=None, token=None):
        asked.append((repo_id, repo_type, revision, allow_patterns, token))
        root = tmp_path / "hub_cache"
        shutil.copytree(tmp_path / "first" / "r-step00000002-state", root / "states" / "r-step00000002-state")
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    trainer, code = run_trainer(train_args(setup, tmp_path / "second", "--resume",
                                           "me/flux-lora/states/r-step00000002-state:main", "--resume_from_huggingface",
                                           "--huggingface_token", "tok"))
    assert code == 0 and trainer.global_step == 4 and len(trainer.losses) == 2
    assert asked == [("me/flux-lora", "model", "main", ["states/r-step00000002-state/*"], "tok")]


def test_hub_resume_spec_parsing_and_errors(setup, tmp_path, monkeypatch, capsys):
    assert parse_hub_resume("a/b/c/d") == ("a/b", "c/d", None, "model")
    assert parse_hub_resume("a/b/c:v1:dataset") == ("a/b", "c", "v1", "dataset")
    assert parse_hub_resume("a/b/c::dataset") == ("a/b", "c", None, "dataset")
    with pytest.raises(HubError, match="repo_owner/repo_name/path"):
        parse_hub_resume("a/b")

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert cli.main(train_args(setup, tmp_path, "--resume", "a/b/state", "--resume_from_huggingface")) == 2
    assert "downloading the state from the Hugging Face Hub failed: offline" in capsys.readouterr().err
