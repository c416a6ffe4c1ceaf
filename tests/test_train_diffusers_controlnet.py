"""flux_train_control_net.py --controlnet_format diffusers on tiny models: a new Union ControlNet from the transformer
(modes per run and per subset), saved with diffusers' keys plus a folder diffusers' from_pretrained loads with our
residuals, rendered by flux_minimal_inference.py; continuing from a diffusers file; alimama-style inpainting; the
option checks."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
from cli_runs import model_args, run_args
import flux_minimal_inference as inference_cli
import flux_train_control_net as cli
from library.models.diffusers_controlnet import load_diffusers_controlnet
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcn-train")
    models = make_tiny_models(base / "models")
    toml = make_controlnet_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def train_args(setup, out, *extra):
    return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "4", "--controlnet_format",
            "diffusers", *extra]


run_trainer = partial(cli_runs.run_trainer, "controlnet")


def test_union_controlnet_trains_saves_for_diffusers_and_comfyui_and_renders(setup, tmp_path):
    from diffusers import FluxControlNetModel

    models, toml = setup
    control = next((toml.parent / "conditioning").glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\na shape --w 32 --h 32 --s 2 --d 5\n")
    trainer, code = run_trainer(train_args(setup, tmp_path / "out", "--output_name", "u", "--controlnet_num_modes",
                                           "4", "--control_mode", "depth", "--sample_prompts", str(prompts),
                                           "--sample_every_n_steps", "4", "--save_precision", "float"))
    assert code == 0
    with_cn, without = (np.asarray(Image.open(p)) for p in sorted((tmp_path / "out" / "sample").glob("*.png")))
    assert not np.array_equal(with_cn, without)
    path = tmp_path / "out" / "u.safetensors"
    weights = load_file(str(path))
    assert weights["controlnet_mode_embedder.weight"].shape[0] == 4
    assert "transformer_blocks.1.attn.to_q.weight" in weights and "single_transformer_blocks.1.proj_mlp.weight" in \
        weights and weights["controlnet_x_embedder.weight"].abs().sum() > 0  # trained away from zero
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev"
    folder = tmp_path / "out" / "u"
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"], config["num_mode"]) == (2, 2, 4)
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_ino == path.stat().st_ino  # a hard link

    ours = load_diffusers_controlnet(path, trainer.models.flux.params).eval()
    theirs = FluxControlNetModel.from_pretrained(folder).eval()
    g, p = torch.Generator().manual_seed(0), trainer.models.flux.params
    img, cond = torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    txt = torch.randn(1, 3, p.context_in_dim, generator=g)
    ids = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    t, y, guidance = torch.tensor([0.4]), torch.randn(1, p.vec_in_dim, generator=g), torch.tensor([3.5])
    with torch.no_grad():
        d, s = ours(img, ids[None], cond, txt, torch.zeros(1, 3, 3), t, y, guidance, mode=2)
        d2, s2 = theirs(hidden_states=img, controlnet_cond=cond, controlnet_mode=torch.tensor([[2]]), timestep=t,
                        guidance=guidance, pooled_projections=y, encoder_hidden_states=txt, txt_ids=torch.zeros(3, 3),
                        img_ids=ids, return_dict=False)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip([*d, *s], [*d2, *s2]))

    common = ["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--device", "cpu", "--width", "32",
              "--height", "32", "--steps", "2", "--seed", "1", "--output_latents"]

    def render(name, *extra):
        assert inference_cli.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
        return load_file(str(next((tmp_path / name).glob("*_latents.safetensors"))))["latents"]

    steered = render("cn", "--controlnet", str(folder), "--control_image", str(control), "--control_mode", "depth")
    assert not torch.allclose(steered, render("plain"))


def test_modes_per_subset_continuing_from_a_diffusers_file(setup, tmp_path):
    models, toml = setup
    _, code = run_trainer(train_args(setup, tmp_path / "a", "--output_name", "a", "--controlnet_num_modes", "3",
                                     "--control_mode", "1", "--gradient_checkpointing", "--save_state"))
    assert code == 0
    start = tmp_path / "a" / "a.safetensors"
    text = toml.read_text().replace("[[datasets.subsets]]", "[[datasets.subsets]]\ncustom_attributes = "
                                    "{ control_mode = 2 }")
    (toml.parent / "modes.toml").write_text(text)
    trainer, code = run_trainer([*train_args((models, toml.parent / "modes.toml"), tmp_path / "b"), "--output_name",
                                 "b", "--controlnet_model_name_or_path", str(start), "--learning_rate", "0",
                                 "--max_train_steps", "1"])
    assert code == 0
    # the subset's mode (2) wins over --control_mode (absent here: continuing sets none)
    inputs = trainer.model_inputs(trainer.train_group.datasets[0][0])
    assert inputs["controlnet_mode"].tolist() == [2] and inputs["controlnet_cond"].shape == (1, 4, 64)
    assert trainer.item_mode({"control_mode": "tile"}) == 1
    s, b = load_file(str(start)), load_file(str(tmp_path / "b" / "b.safetensors"))
    assert s.keys() == b.keys() and all(torch.equal(s[k], b[k]) for k in s)


def test_inpainting_controlnet_trains_on_masks_and_renders(setup, tmp_path):
    models, toml = setup
    _, code = run_trainer(train_args(setup, tmp_path / "out", "--output_name", "inp", "--controlnet_inpainting",
                                     "--controlnet_double_blocks", "1", "--controlnet_single_blocks", "0"))
    assert code == 0
    weights = load_file(str(tmp_path / "out" / "inp.safetensors"))
    assert weights["controlnet_x_embedder.weight"].shape == (64, 68) and weights["controlnet_x_embedder.weight"].any()
    assert json.loads((tmp_path / "out" / "inp" / "config.json").read_text())["extra_condition_channels"] == 4
    image = next((toml.parent / "images").glob("*.png"))
    mask = next((toml.parent / "conditioning").glob("*.png"))
    assert inference_cli.main(["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--width", "32",
                               "--height", "32", "--steps", "2", "--output_dir", str(tmp_path / "r"), "--controlnet",
                               str(tmp_path / "out" / "inp.safetensors"), "--image", str(image), "--mask_image",
                               str(mask)]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--controlnet_format", "sd-scripts", "--controlnet_num_modes", "3"], "add --controlnet_format diffusers"),
    (["--controlnet_inpainting", "--cache_latents"], "remove --cache_latents"),
    (["--control_mode", "canny"], "not a Union model"),
])
def test_option_checks(setup, tmp_path, capsys, extra, message):
    assert cli.main([*train_args(setup, tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_equals_uninterrupted(setup, tmp_path):
    common = ("--save_every_n_steps", "2", "--save_state", "--output_name", "r", "--controlnet_num_modes", "2",
              "--control_mode", "1", "--controlnet_double_blocks", "1", "--controlnet_single_blocks", "1")
    _, code = run_trainer(train_args(setup, tmp_path / "full", *common))
    assert code == 0
    _, code = run_trainer(train_args(setup, tmp_path / "resumed", *common, "--resume",
                                     str(tmp_path / "full" / "r-step00000002-state")))
    assert code == 0
    a, b = load_file(str(tmp_path / "full" / "r.safetensors")), load_file(str(tmp_path / "resumed" / "r.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_block_swapped_base_trains_the_same_controlnet(tmp_path):
    """The frozen base's blocks swapped (4 double + 8 single blocks: swappable) while a diffusers-layout Union
    ControlNet trains: the same weights as without swapping."""
    models, _ = cli_runs.swappable_tiny_models(tmp_path / "swap")
    toml = make_controlnet_demo_dataset(tmp_path / "data", count=2, size=32)
    out = {}
    for name, extra in (("plain", []), ("swapped", ["--blocks_to_swap", "3"])):
        _, code = run_trainer([*run_args(models, toml, tmp_path / name), "--learning_rate", "1e-3",
                               "--max_train_steps", "2", "--controlnet_format", "diffusers", "--controlnet_num_modes",
                               "2", "--control_mode", "1", "--output_name", "cn", *extra])
        assert code == 0
        out[name] = load_file(str(tmp_path / name / "cn.safetensors"))
    assert out["plain"].keys() == out["swapped"].keys()
    assert all(torch.equal(out["plain"][k], out["swapped"][k]) for k in out["plain"])
    assert out["plain"]["controlnet_x_embedder.weight"].any()


def test_cached_condition_latents_train_as_live_encoding_and_follow_edits(setup, tmp_path, monkeypatch):
    """--cache_latents_to_disk: each conditioning image is a ControlItem of the latent cache (an npz beside it, as
    Flex.2's control pictures), the ControlNet trained from them equals the one trained with the conditions encoded
    every step (the recipe without control caching: same pixels, same AE mean), and an edited conditioning image is
    encoded again on the next run; a frozen diffusers ControlNet beside a LoRA reads them too."""
    import shutil
    from dataclasses import replace

    from library.training.recipes.control_inputs import diffusers_latent_condition, encode_mean
    from library.training.recipes.controlnet import ControlNetTrainer

    models, toml = setup
    data = tmp_path / "data"
    shutil.copytree(toml.parent, data)
    (data / "dataset.toml").write_text(toml.read_text().replace(str(toml.parent.resolve().as_posix()),
                                                                str(data.resolve().as_posix())))
    toml = data / "dataset.toml"
    extra = ("--output_name", "d", "--controlnet_double_blocks", "1", "--controlnet_single_blocks", "0",
             "--cache_latents_to_disk")
    trainer, code = run_trainer(train_args((models, toml), tmp_path / "cached", *extra))
    assert code == 0
    cached = sorted((data / "conditioning").glob("*_flux.npz"))
    assert len(cached) == 2  # one per conditioning image, beside it
    batch = next(iter(trainer.loader))
    assert batch.control_latents is not None and batch.conditioning_images is None
    item = next(i for i in trainer.train_group.items if str(i.absolute_path) == batch.image_keys[0])
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    assert torch.allclose(batch.control_latents[0], encode_mean(trainer.models.ae, pixels[None])[0].cpu(), atol=1e-5)
    assert trainer.models.ae.device == torch.device("cpu")  # not needed on the device to train

    kinds = ControlNetTrainer.dataset_kinds
    with monkeypatch.context() as m:  # the conditions encoded every step (the target latents cached as above)
        m.setattr(ControlNetTrainer, "dataset_kinds", lambda self: replace(kinds(self), control_latents=False))
        live, code = run_trainer(train_args((models, toml), tmp_path / "live", *extra))
    assert code == 0
    batch = next(iter(live.loader))
    assert batch.control_latents is None and batch.conditioning_images is not None
    a, b = load_file(str(tmp_path / "cached" / "d.safetensors")), load_file(str(tmp_path / "live" / "d.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    control = item.conditioning_path
    Image.fromarray(255 - np.asarray(Image.open(control).convert("RGB"))).save(control)
    before = {p: p.stat().st_mtime_ns for p in cached}
    trainer, code = run_trainer(train_args((models, toml), tmp_path / "edited", *extra))
    assert code == 0
    changed = [p for p in cached if p.stat().st_mtime_ns != before[p]]
    assert [p.name.split("_")[0] for p in changed] == [control.stem.split("_")[0]]
    batch = next(b for b in trainer.loader if b.image_keys[0] == str(item.absolute_path))
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    assert torch.allclose(batch.control_latents[0], encode_mean(trainer.models.ae, pixels[None])[0].cpu(), atol=1e-5)

    # the saved file read back as a frozen ControlNet: cached conditions; an inpainting one's are not cacheable
    assert diffusers_latent_condition(type("A", (), {"controlnet_model_name_or_path": str(tmp_path / "cached" /
                                                                                           "d.safetensors")})())
    assert not diffusers_latent_condition(type("A", (), {"controlnet_format": "diffusers",
                                                         "controlnet_inpainting": True})())
    assert not diffusers_latent_condition(type("A", (), {"controlnet_format": "sd-scripts"})())
    lora, code = cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "lora"), "--learning_rate",
                                                  "1e-3", "--max_train_steps", "2", "--network_module",
                                                  "networks.lora_flux", "--network_dim", "4", "--cache_latents",
                                                  "--controlnet_model_name_or_path",
                                                  str(tmp_path / "cached" / "d.safetensors")])
    assert code == 0
    batch = next(iter(lora.loader))
    assert batch.control_latents is not None and batch.conditioning_images is None
