"""FLUX.1 Canny / Depth training on tiny models: a BFL control LoRA trained on dev (flux_train_network.py
--network_module networks.control_lora_flux) is written in BFL's layout, loads in our inference and in diffusers'
FluxControlPipeline with the same output; LoRA and full fine-tuning of a full Canny model; the maps tool."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cli_runs
from cli_runs import run_args
from library.data.control_maps import canny_map
from library.flow.canny_depth import ControlEncoder, bind_control
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.sampling import Conditioning, get_noise
from library.formats.control_lora import control_lora_to_diffusers, is_control_lora, read_control_lora
from library.formats.safetensors_io import load_tensors
from library.lora.control import ControlLoRA
from library.models.autoencoder import load_ae
from library.models.loading import load_flow_model
from library.models.packing import pack_latents
from library.models.variants import VARIANTS
from tools.make_control_maps import make_control_maps
from tools.make_demo_dataset import make_controlnet_demo_dataset
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONTROL_LORA = ["--network_module", "networks.control_lora_flux", "--network_dim", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("control_lora")
    return make_tiny_models(base / "models"), make_controlnet_demo_dataset(base / "data", count=2, size=32)


def train(kind, models, toml, out, *extra):
    return cli_runs.run_trainer(kind, [*run_args(models, toml, out), "--learning_rate", "1e-3", "--max_train_steps",
                                       "3", *extra])


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    models, toml = setup
    out = tmp_path_factory.mktemp("trained")
    control = next((toml.parent / "conditioning").glob("*.png"))
    prompts = out / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\n")
    trainer, status = train("network", models, toml, out / "out", *CONTROL_LORA, "--network_args", "control=depth",
                            "--output_name", "ctl", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3")
    assert status == 0
    return out / "out" / "ctl.safetensors", control, trainer


def test_trained_control_lora_is_bfl_format(trained):
    path, _, trainer = trained
    sd = load_tensors(path)
    assert is_control_lora(sd)
    weights = read_control_lora(sd)
    assert weights.loras["img_in"][0].shape == (4, 128)
    names = set(weights.loras)
    assert {"txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer", "final_layer.linear",
            "final_layer.adaLN_modulation.1", "double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"} <= names
    assert all(b.abs().sum() > 0 for _, b, _ in weights.loras.values())  # B and biases trained away from zero
    assert all(bias.abs().sum() > 0 for _, _, bias in weights.loras.values())
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in weights.norms
    assert any(not torch.equal(v, torch.ones_like(v)) for v in weights.norms.values())  # norms trained
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-depth-dev/lora"
    assert trainer.models.variant.name == "depth"
    assert trainer.loss_fn.settings.guidance_scale == 10.0
    assert len(list((path.parent / "sample").glob("*.png"))) == 1


def test_trained_control_lora_loads_in_diffusers_with_the_same_output(setup, trained, monkeypatch):
    """FluxControlPipeline.load_lora_weights on a tiny pipeline (img_in widened by diffusers itself, LoRA biases,
    norm replacement) gives what our hooked ControlLoRA gives. The file's diffusers names come from
    control_lora_to_diffusers, checked against diffusers' own BFL converter at real size (test_control_lora.py),
    which cannot take a tiny model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from model_helpers import diffusers_reference
    from test_kontext_inference import diffusers_ae

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    models, _ = setup
    path, control, _ = trained
    _, flux = load_flow_model(models["flux"], torch.float32, "cpu")
    ae = load_ae(models["ae"], torch.float32, "cpu")
    flux.eval()
    reference = diffusers_reference(flux)  # before the LoRA: diffusers widens its own x_embedder
    weights = read_control_lora(load_tensors(path))
    ControlLoRA(flux, multiplier=1.0, weights=weights).apply_to(flux)
    width, height, seed, steps = 32, 32, 3, 2
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 7, flux.params.context_in_dim, generator=g),
                        torch.randn(1, flux.params.vec_in_dim, generator=g), torch.zeros(1, 7, 3))
    tokens = ControlEncoder(ae)(control, width, height)
    settings = GenerationSettings(prompt="", width=width, height=height, steps=steps, seed=seed)
    ours = generate_latents(FluxModels(bind_control(flux, tokens), ae, None, None, None, VARIANTS["depth"],
                                       torch.float32), settings, cond, None, Placement("cpu", False), progress=False)

    pipe = FluxControlPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=diffusers_ae(ae), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=reference)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(control_lora_to_diffusers(weights, flux.params.hidden_size))
    assert pipe.transformer.x_embedder.in_features == 128
    with torch.no_grad():
        theirs = pipe(control_image=Image.open(control), prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y,
                      latents=get_noise(1, height, width, seed), height=height, width=width,
                      num_inference_steps=steps, guidance_scale=10.0, output_type="latent").images
    torch.testing.assert_close(pack_latents(ours), theirs, atol=1e-4, rtol=1e-4)


def test_lora_and_full_fine_tuning_of_a_full_canny_model(setup, tmp_path):
    _, toml = setup
    canny = make_tiny_models(tmp_path / "canny", model_type="canny")
    trainer, status = train("network", canny, toml, tmp_path / "lora", "--network_module", "networks.lora_flux",
                            "--network_dim", "4", "--output_name", "l")
    assert status == 0 and trainer.control == "canny" and trainer.loss_fn.settings.guidance_scale == 30.0
    with safe_open(str(tmp_path / "lora" / "l.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-canny-dev/lora"
    trainer, status = train("full", canny, toml, tmp_path / "full", "--output_name", "f", "--max_train_steps", "2")
    assert status == 0
    saved = load_tensors(tmp_path / "full" / "f.safetensors")
    assert saved["img_in.weight"].shape[1] == 128
    before = load_tensors(canny["flux"])
    assert not torch.equal(saved["img_in.weight"][:, 64:].float(), before["img_in.weight"][:, 64:].float())


def test_make_control_maps_writes_canny_maps(setup, tmp_path):
    _, toml = setup
    images = toml.parent / "images"
    written = make_control_maps(images, tmp_path / "canny", "canny")
    assert len(written) == 2
    for path in written:
        source = np.asarray(Image.open(images / path.name).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(path)), canny_map(source))
    assert make_control_maps(images, tmp_path / "canny", "canny") == []  # kept unless --overwrite


def test_control_lora_with_fp8_base_and_block_swap(tmp_path):
    """The frozen dev in fp8 (img_in upcast when widened) and with blocks swapped: the run trains and saves."""
    from cli_runs import swappable_tiny_models

    models, _ = swappable_tiny_models(tmp_path)
    toml = make_controlnet_demo_dataset(tmp_path / "cn", count=2, size=32)
    _, status = train("network", models, toml, tmp_path / "fp8", *CONTROL_LORA, "--fp8_base", "--mixed_precision",
                      "bf16", "--max_train_steps", "2", "--output_name", "f")
    assert status == 0 and is_control_lora(load_tensors(tmp_path / "fp8" / "f.safetensors"))
    _, status = train("network", models, toml, tmp_path / "swap", *CONTROL_LORA, "--blocks_to_swap", "4",
                      "--max_train_steps", "2", "--output_name", "s")
    assert status == 0 and is_control_lora(load_tensors(tmp_path / "swap" / "s.safetensors"))


@pytest.mark.parametrize("kw", [{"trainer": "full"}, {"network_module": "networks.control_lora_flux",
                                                      "network_dim": 4}], ids=["full-canny", "control-lora"])
def test_memory_planner_covers_canny_and_control_loras(kw):
    """The planner's prediction of a full Canny model (128 features) and of a control LoRA on dev (img_in widened
    by the network) against the same step run on the CPU."""
    from dataclasses import replace as dc_replace

    from library.models.transformer import FLUX_PRESETS
    from library.planner.plan import PlanSettings, plan_memory
    from library.planner.report import measure_cpu_step

    params = FLUX_PRESETS["tiny"]
    if kw.get("trainer") == "full":
        params = dc_replace(params, in_channels=128)
    s = PlanSettings(model="test", params=params, width=128, height=128, t5_tokens=64, mixed_precision="no",
                     target="cpu", **kw)
    plan = plan_memory(s)
    assert plan.peak_bytes == pytest.approx(measure_cpu_step(s)["peak_bytes"], rel=0.10)


def test_control_latent_cache_encodes_each_map_once(setup):
    from library.flow.canny_depth import ControlLatentCache, encode_control

    models, _ = setup
    ae = load_ae(models["ae"], torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    cache = ControlLatentCache()
    first = cache(torch.cat((a, b)), ae)
    assert cache.encoded == 2 and torch.equal(first, encode_control(torch.cat((a, b)), ae))
    again = cache(torch.cat((b, c, a)), ae)
    assert cache.encoded == 3  # only c was new
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    small = ControlLatentCache(max_bytes=1)  # over the limit: older entries dropped, the batch's kept
    small(a, ae), small(b, ae), small(a, ae)
    assert small.encoded == 3


def test_control_kind_of_a_run(setup):
    import argparse

    from library.training.errors import TrainingError
    from library.training.recipes.canny_depth import control_kind

    models, _ = setup
    run = dict(pretrained_model_name_or_path=str(models["flux"]), model_type="flux")
    assert control_kind(argparse.Namespace(**run, network_module="networks.lora_flux", network_args=[])) is None
    assert control_kind(argparse.Namespace(**run, network_module=CONTROL_LORA[1], network_args=[])) == "canny"
    with pytest.raises(TrainingError, match="network_args control=edges: expected canny or depth"):
        control_kind(argparse.Namespace(**run, network_module=CONTROL_LORA[1], network_args=["control=edges"]))


def test_make_control_maps_writes_depth_maps_with_a_local_model(setup, tmp_path):
    from library.models.depth import DepthEstimator
    from test_canny_depth_inference import tiny_depth_model

    _, toml = setup
    images = toml.parent / "images"
    folder = tiny_depth_model(tmp_path / "depth_model")
    written = make_control_maps(images, tmp_path / "depth", "depth", str(folder))
    estimator = DepthEstimator(folder)
    for path in written:
        source = np.asarray(Image.open(images / path.name).convert("RGB"))
        expected = ((estimator(source)[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(Image.open(path)), expected)
    with pytest.raises(ValueError, match="needs --depth_model"):
        make_control_maps(images, tmp_path / "d2", "depth")


def copy_dataset(toml, dest):
    """The demo dataset copied to `dest` (its toml pointing there): the cache files and edits stay in the copy."""
    import shutil

    shutil.copytree(toml.parent, dest)
    text = toml.read_text().replace(str(toml.parent.resolve().as_posix()), str(dest.resolve().as_posix()))
    (dest / "dataset.toml").write_text(text)
    return dest / "dataset.toml"


def test_cached_control_latents_train_as_live_encoding_and_follow_edits(setup, tmp_path, monkeypatch):
    """--cache_latents_to_disk: each control map is a ControlItem of the latent cache (an npz beside it, as Flex.2's),
    the LoRA trained from them equals the one trained with the maps encoded live (the recipe without control caching:
    same pixels, same AE mean; equal up to fp32 rounding of the AE's batched convolutions), and an edited map is
    encoded again on the next run."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from library.training.recipes.canny_depth import ControlHooks
    from library.training.recipes.control_inputs import encode_mean

    models, toml = setup
    toml = copy_dataset(toml, tmp_path / "data")
    extra = (*CONTROL_LORA, "--network_args", "control=depth", "--output_name", "c", "--cache_latents_to_disk")
    trainer, code = train("network", models, toml, tmp_path / "cached", *extra)
    assert code == 0
    cached = sorted((tmp_path / "data" / "conditioning").glob("*_flux.npz"))
    assert len(cached) == 2  # one per control map, beside it
    batch = next(iter(trainer.loader))
    assert batch.control_latents is not None and batch.conditioning_images is None
    item = next(i for i in trainer.train_group.items if str(i.absolute_path) == batch.image_keys[0])
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    assert torch.allclose(batch.control_latents[0], encode_mean(trainer.models.ae, pixels[None])[0].cpu(), atol=1e-5)

    kinds = ControlHooks.dataset_kinds
    with monkeypatch.context() as m:  # the maps encoded live during training (the target latents cached as above)
        m.setattr(ControlHooks, "dataset_kinds", lambda self: replace(kinds(self), control_latents=False))
        live, code = train("network", models, toml, tmp_path / "live", *extra)
    assert code == 0
    batch = next(iter(live.loader))
    assert batch.control_latents is None and batch.conditioning_images is not None
    a, b = load_file(str(tmp_path / "cached" / "c.safetensors")), load_file(str(tmp_path / "live" / "c.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)

    control = item.conditioning_path
    Image.fromarray(255 - np.asarray(Image.open(control).convert("RGB"))).save(control)
    before = {p: p.stat().st_mtime_ns for p in cached}
    trainer, code = train("network", models, toml, tmp_path / "edited", *extra)
    assert code == 0
    changed = [p for p in cached if p.stat().st_mtime_ns != before[p]]
    assert [p.name.split("_")[0] for p in changed] == [control.stem.split("_")[0]]
    batch = next(b for b in trainer.loader if b.image_keys[0] == str(item.absolute_path))
    pixels = trainer.train_group.datasets[0].load_conditioning(item, flipped=False)
    assert torch.allclose(batch.control_latents[0], encode_mean(trainer.models.ae, pixels[None])[0].cpu(), atol=1e-5)
