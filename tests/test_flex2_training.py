"""Flex.2 training (library/training/recipes/flex2.py): the per-step condition (seeded, dropouts, masks), the
bypassed guidance embedder, and the command line end to end on a tiny Flex.2-like file: LoRA training a few steps
with control pictures -> inference with control and inpaint inputs; full fine-tuning a step."""


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cli_runs
from cli_runs import model_args, run_args
import flux_minimal_inference as inference_cli
from library.models.flex2 import Flex2Model
from library.models.packing import pack_latents
from library.training.recipes.flex2 import random_inpaint_mask, step_generator, training_condition
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models


def test_masks_and_draws_are_seeded_by_step_and_images():
    a = random_inpaint_mask(8, 8, step_generator(7, 3, ["x.png"]))
    assert torch.equal(a, random_inpaint_mask(8, 8, step_generator(7, 3, ["x.png"])))
    assert not torch.equal(a, random_inpaint_mask(8, 8, step_generator(7, 4, ["x.png"])))
    assert 0 < a.sum() < 64 and set(a.unique().tolist()) <= {0.0, 1.0}


def test_training_condition_by_chance():
    lat = torch.randn(2, 16, 4, 4)
    ctrl = torch.randn(2, 16, 4, 4)

    def cond(**chances):
        return training_condition(lat, ctrl, torch.Generator().manual_seed(0), **chances)

    off = cond(inpaint_dropout=1.0, control_dropout=1.0, invert_inpaint_mask_chance=0.0)
    assert off.shape == (2, 4, 132)
    assert off[..., :64].abs().sum() == 0 and torch.equal(off[..., 64:68], torch.ones(2, 4, 4))
    assert off[..., 68:].abs().sum() == 0
    on = cond(inpaint_dropout=0.0, control_dropout=0.0, invert_inpaint_mask_chance=0.0)
    assert torch.equal(on[..., 68:], pack_latents(ctrl))  # the control latent at strength 1
    mask = on[..., 64:68]  # packed mask: 1 = generate; the inpaint latent is zero exactly there
    inpaint = on[..., :64].reshape(2, 4, 16, 4)
    assert torch.all(inpaint[mask[:, :, None, :].expand_as(inpaint) == 1] == 0)
    kept = mask[:, :, None, :].expand_as(inpaint) == 0
    assert torch.equal(inpaint[kept], pack_latents(lat).reshape(2, 4, 16, 4)[kept])
    inverted = cond(inpaint_dropout=0.0, control_dropout=0.0, invert_inpaint_mask_chance=1.0)
    assert torch.equal(inverted[..., 64:68], 1 - mask)  # the same draws, the mask inverted
    none = training_condition(lat, None, torch.Generator().manual_seed(0), inpaint_dropout=0.0,
                              control_dropout=0.0, invert_inpaint_mask_chance=0.0)
    assert none[..., 68:].abs().sum() == 0  # samples without a control picture


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("flex2train")
    models = make_tiny_models(base / "models", model_type="flex2")
    toml = make_controlnet_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def train_args(setup, out, *extra):
    return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "3", *extra]


def test_lora_trains_with_bypassed_guidance_and_renders_with_control_and_inpaint(setup, tmp_path):
    models, toml = setup
    control = next((toml.parent / "conditioning").glob("*.png"))
    image = next((toml.parent / "images").glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\n")
    trainer, code = cli_runs.run_trainer("network", train_args(
        setup, tmp_path / "out", "--network_module", "networks.lora_flux", "--network_dim", "4",
        "--output_name", "flex", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
        "--cache_latents"))
    assert code == 0 and trainer.flex2 and len(trainer.losses) == 3
    assert all(np.isfinite(trainer.losses))
    denoiser = trainer.loss_fn.model
    assert isinstance(denoiser, Flex2Model) and denoiser.bypass_guidance
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1
    lora = tmp_path / "out" / "flex.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flex-2-preview/lora"
    # the same batch condition at the same step: resumable draws
    batch = next(iter(trainer.loader))
    trainer.global_step = 1
    a = trainer.model_inputs(batch)["extra_channels"]
    assert torch.equal(a, trainer.model_inputs(batch)["extra_channels"])
    # inference with the LoRA, a control picture and an inpaint mask
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(mask)
    out = tmp_path / "render"
    assert inference_cli.main(["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--device", "cpu",
                               "--steps", "2", "--seed", "1", "--output_dir", str(out), "--lora_weights", str(lora),
                               "--control_image", str(control), "--image", str(image), "--mask_image", str(mask),
                               "--control_stop", "1"]) == 0
    png = Image.open(next(out.glob("*.png")))
    assert png.size == (32, 32) and png.text["control_image"] == str(control) and png.text["control_stop"] == "1"


def test_full_fine_tuning_trains_flex2(setup, tmp_path):
    trainer, code = cli_runs.run_trainer("full", train_args(setup, tmp_path, "--max_train_steps", "1",
                                                            "--output_name", "ft", "--inpaint_dropout", "0"))
    assert code == 0 and trainer.flex2 and trainer.flex2_chances["inpaint_dropout"] == 0.0
    with safe_open(str(tmp_path / "ft.safetensors"), "pt") as f:
        assert f.get_slice("img_in.weight").get_shape()[1] == 196
        assert f.metadata()["modelspec.architecture"] == "flex-2-preview"


def test_readme_flex2_command_lines_parse_and_verify():
    """The README's Flex.2 section: each command line parses and passes its trainer's checks."""
    import re
    import shlex

    import flux_minimal_inference
    import flux_train
    import flux_train_network
    from conftest import ROOT
    from library.training.arguments import verify_training_args

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Flex.2\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["python", "flux_minimal_inference.py", "--ckpt_path"]] * 2 + [
        ["accelerate", "launch", "flux_train_network.py"], ["accelerate", "launch", "flux_train.py"]]
    for argv in commands[:2]:
        args = flux_minimal_inference.setup_parser().parse_args(argv[2:])
        assert args.control_image
    for argv, entry in zip(commands[2:], (flux_train_network, flux_train)):
        args = entry.setup_parser().parse_args(argv[3:])
        verify_training_args(args, entry.COMMAND_LINE)


def test_control_latents_are_cached_with_the_latents_and_follow_edits(setup, tmp_path):
    """--cache_latents_to_disk: each control picture's posterior mean, through its target's geometry, is cached
    beside it with the latent cache's provenance, so an edited control picture is encoded again."""
    import shutil

    from library.training.recipes.flex2 import encode_mean

    models, toml = setup
    data = tmp_path / "data"
    shutil.copytree(toml.parent, data)
    text = toml.read_text().replace(str(toml.parent.resolve().as_posix()), str(data.resolve().as_posix()))
    (data / "dataset.toml").write_text(text)
    argv = [*run_args(models, data / "dataset.toml", tmp_path / "out"), "--learning_rate", "1e-3",
            "--max_train_steps", "1", "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--cache_latents_to_disk"]
    trainer, code = cli_runs.run_trainer("network", argv)
    assert code == 0
    cached = sorted((data / "conditioning").glob("*_flux.npz"))
    assert len(cached) == 2  # one per control picture, beside it
    batch = next(iter(trainer.loader))
    assert batch.control_latents is not None and batch.conditioning_images is None
    item = next(i for i in trainer.train_group.items if str(i.absolute_path) == batch.image_keys[0])
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    expected = encode_mean(trainer.models.ae, pixels[None])[0].cpu()
    assert torch.allclose(batch.control_latents[0], expected, atol=1e-5)
    # an edited control picture is re-encoded on the next run; the other one is not
    control = item.conditioning_path
    Image.fromarray(255 - np.asarray(Image.open(control).convert("RGB"))).save(control)
    before = {p: p.stat().st_mtime_ns for p in cached}
    trainer, code = cli_runs.run_trainer("network", argv)
    assert code == 0
    changed = [p for p in cached if p.stat().st_mtime_ns != before[p]]
    assert [p.name.split("_")[0] for p in changed] == [control.stem.split("_")[0]]
    batch = next(b for b in trainer.loader if b.image_keys[0] == str(item.absolute_path))
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    assert torch.allclose(batch.control_latents[0], encode_mean(trainer.models.ae, pixels[None])[0].cpu(), atol=1e-5)


def test_resume_equals_uninterrupted_with_the_per_step_draws(setup, tmp_path):
    """The masks and dropouts are drawn from (seed, step, images): a run resumed at step 2 ends with the same LoRA."""
    from safetensors.torch import load_file

    common = ("--network_module", "networks.lora_flux", "--network_dim", "4", "--max_train_steps", "4",
              "--save_every_n_steps", "2", "--save_state", "--output_name", "r", "--cache_latents")
    full, code = cli_runs.run_trainer("network", train_args(setup, tmp_path / "full", *common))
    assert code == 0
    state = tmp_path / "full" / "r-step00000002-state"
    resumed, code = cli_runs.run_trainer("network", train_args(setup, tmp_path / "resumed", *common,
                                                               "--resume", str(state)))
    assert code == 0 and resumed.losses == full.losses[2:]
    a, b = (load_file(str(tmp_path / d / "r.safetensors")) for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_blur_and_dilation():
    from library.training.recipes.flex2 import blur_mask, dilate_mask

    m = torch.zeros(16, 16)
    m[4:12, 4:12] = 1
    blurred = [blur_mask(m, torch.Generator().manual_seed(s)) for s in range(8)]
    soft = [b for b in blurred if not torch.equal(b, m)]
    assert soft and len(soft) < 8  # about half of the draws
    for b in soft:
        assert 0 < b[4, 4] < 1 and b[8, 8] > 0.9 and b[0, 0] < 0.05 and torch.allclose(b.sum(), m.sum(), rtol=0.05)
    sizes = {int(dilate_mask(m, torch.Generator().manual_seed(s)).sum()) for s in range(64)}
    assert min(sizes) < 64 < max(sizes)  # eroded and grown by up to one cell (5% of 16)
    lat = torch.randn(1, 16, 16, 16)
    on = training_condition(lat, None, torch.Generator().manual_seed(1), inpaint_dropout=0.0, control_dropout=0.0,
                            invert_inpaint_mask_chance=0.0, blur=True, dilate=True)
    assert on.shape == (1, 64, 132)


def test_flex2_refuses_a_frozen_controlnet(setup, tmp_path):
    from library.training.errors import TrainingError

    with pytest.raises(TrainingError, match="--controlnet_model_name_or_path with Flex.2"):
        cli_runs.run_trainer("network", train_args(setup, tmp_path, "--network_module", "networks.lora_flux",
                                                   "--controlnet_model_name_or_path", str(tmp_path / "cn.safetensors")))
