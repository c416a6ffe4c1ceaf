"""FLUX.1-Krea-dev: dev's architecture and keys, named by --model_type krea or by a file's ModelSpec metadata
(`flux-1-krea-dev`), its own defaults only where library/models/variants.py says, and saved files naming it."""

import argparse
import dataclasses

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
import flux_minimal_inference as inference
from cli_runs import run_args
from library import flux_utils
from library.formats.safetensors_io import save_file_atomic
from library.models.variants import VARIANTS
from library.training.errors import TrainingError
from library.training.setup import model_variant
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

KREA_METADATA = {"modelspec.architecture": "flux-1-krea-dev", "modelspec.sai_model_spec": "1.0.1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("krea")
    models = make_tiny_models(base / "models")
    krea = dict(models, flux=base / "models" / "flux1-krea-dev.safetensors")
    save_file_atomic(load_file(str(models["flux"])), krea["flux"], KREA_METADATA)  # dev's tensors, Krea's label
    schnell = make_tiny_models(base / "schnell", preset="tiny-schnell")
    return {"dev": models, "krea": krea, "schnell": schnell, "data": make_demo_dataset(base / "data", count=2, size=32)}


def test_krea_defaults_differ_from_devs_only_in_the_table():
    dev, krea = VARIANTS["dev"], VARIANTS["krea"]
    differing = {f.name for f in dataclasses.fields(dev) if getattr(dev, f.name) != getattr(krea, f.name)}
    assert differing == {"name", "architecture", "guidance", "notes"}
    assert (krea.guidance, dev.guidance) == (4.5, 3.5) and krea.training_guidance == dev.training_guidance == 3.5
    assert krea.licence == dev.licence == "FLUX.1 [dev] Non-Commercial License"


def test_a_krea_file_loads_with_devs_architecture_and_is_named_by_its_metadata(tiny):
    krea, dev = flux_utils.analyze_checkpoint(tiny["krea"]["flux"]), flux_utils.analyze_checkpoint(tiny["dev"]["flux"])
    assert krea.params == dev.params and krea.params.guidance_embed
    is_schnell, model = flux_utils.load_flow_model(tiny["krea"]["flux"], torch.float32, "cpu")
    _, dev_model = flux_utils.load_flow_model(tiny["dev"]["flux"], torch.float32, "cpu")
    assert not is_schnell and model.params == dev_model.params
    a, b = model.state_dict(), dev_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def variant(model_type, files):
        args = argparse.Namespace(model_type=model_type, pretrained_model_name_or_path=str(files["flux"]))
        return model_variant(args, flux_utils.analyze_checkpoint(files["flux"])).name

    assert variant("flux", tiny["krea"]) == "krea"  # from the file's ModelSpec metadata
    assert variant("krea", tiny["dev"]) == "krea"  # named: dev's keys cannot tell
    assert variant("flux", tiny["dev"]) == "dev"
    with pytest.raises(TrainingError, match="--model_type krea does not fit .*no guidance embedder"):
        variant("krea", tiny["schnell"])


def test_inference_with_model_type_krea_uses_krea_guidance(tiny, tmp_path):
    def render(files, out, *extra):
        assert inference.main(["--ckpt_path", str(files["flux"]), "--ae", str(files["ae"]), "--clip_l",
                               str(files["clip_l"]), "--t5xxl", str(files["t5xxl"]), "--tokenizer_cache_dir",
                               str(files["tokenizers"]), "--dtype", "fp32", "--width", "32", "--height", "32",
                               "--steps", "2", "--seed", "1", "--output_dir", str(out), *extra]) == 0
        with Image.open(next(out.glob("*.png"))) as im:
            return im.text

    assert render(tiny["dev"], tmp_path / "named", "--model_type", "krea")["guidance"] == "4.5"
    assert render(tiny["krea"], tmp_path / "file")["guidance"] == "4.5"  # from its metadata
    assert render(tiny["dev"], tmp_path / "dev")["guidance"] == "3.5"


def train(kind, tiny, model, out, *extra):
    args = [*run_args(tiny[model], tiny["data"], out), "--learning_rate", "1e-3", "--max_train_steps", "1",
            "--cache_latents", *extra]
    if kind == "network":
        args += ["--network_module", "networks.lora_flux", "--network_dim", "4", "--network_train_unet_only"]
    trainer, code = cli_runs.run_trainer(kind, args)
    assert code == 0
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        return trainer, f.metadata()


def test_saved_lora_and_fine_tune_say_flux_1_krea_dev(tiny, tmp_path):
    trainer, md = train("network", tiny, "dev", tmp_path / "lora", "--model_type", "krea")
    assert trainer.models.variant.name == "krea" and trainer.models.tokenizer.t5_max_length == 16  # as given
    assert md["modelspec.architecture"] == "flux-1-krea-dev/lora" and md["ss_guidance_scale"] == "3.5"
    _, md = train("full", tiny, "krea", tmp_path / "full")  # named by the file's own metadata
    assert md["modelspec.architecture"] == "flux-1-krea-dev"
    saved = flux_utils.analyze_checkpoint(tmp_path / "full" / "last.safetensors")
    args = argparse.Namespace(model_type="flux", pretrained_model_name_or_path="x")
    assert model_variant(args, saved).name == "krea"  # a Krea fine-tune stays Krea when trained again
