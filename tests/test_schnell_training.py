"""Training FLUX.1-schnell: no guidance input (the loss ignores --guidance_scale, which warns once), T5 256 tokens by
default, sample images in 4 unshifted steps (library/models/variants.py)."""

import logging

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from library.flow.sampling import get_schedule
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

WARNING = "has no effect: FLUX.1 schnell has no guidance input"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("schnell")
    return {"schnell": make_tiny_models(base / "schnell", preset="tiny-schnell"),
            "dev": make_tiny_models(base / "dev"), "data": make_demo_dataset(base / "data", count=2, size=32)}


def argv(tiny, model, kind, out, *extra):
    args = [*run_args(tiny[model], tiny["data"], out), "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--cache_latents", *extra]
    if kind == "network":
        args += ["--network_module", "networks.lora_flux", "--network_dim", "4", "--network_train_unet_only"]
    return args


def trained(tiny, model, kind, out, *extra):
    trainer, code = cli_runs.run_trainer(kind, argv(tiny, model, kind, out, *extra))
    assert code == 0
    return trainer, load_file(str(out / "last.safetensors"))


@pytest.mark.parametrize("kind", ["network", "full"])
def test_a_schnell_step_has_the_same_loss_for_any_guidance_scale_and_warns_once(tiny, tmp_path, kind, caplog):
    with caplog.at_level(logging.WARNING):
        low, low_weights = trained(tiny, "schnell", kind, tmp_path / "low", "--guidance_scale", "1.0")
        high, high_weights = trained(tiny, "schnell", kind, tmp_path / "high", "--guidance_scale", "9.0")
    assert low.losses == high.losses and len(low.losses) == 2
    assert low_weights.keys() == high_weights.keys()
    assert all(torch.equal(low_weights[k], high_weights[k]) for k in low_weights)
    assert caplog.text.count(f"--guidance_scale 9.0 {WARNING}") == 1
    assert caplog.text.count(f"--guidance_scale 1.0 {WARNING}") == 1


def test_the_same_guidance_scales_change_a_dev_step(tiny, tmp_path, caplog):
    """The control: with a guidance embedder, the value reaches the model (and nothing warns)."""
    with caplog.at_level(logging.WARNING):
        low, _ = trained(tiny, "dev", "network", tmp_path / "low", "--guidance_scale", "1.0")
        high, _ = trained(tiny, "dev", "network", tmp_path / "high", "--guidance_scale", "9.0")
    assert low.losses != high.losses
    assert "has no guidance input" not in caplog.text


def test_schnell_defaults_t5_256_and_samples_in_4_unshifted_steps(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --d 1\n")  # no --s: the model's preview steps
    args = argv(tiny, "schnell", "network", tmp_path / "out", "--sample_prompts", str(prompts))
    del args[args.index("--t5xxl_max_token_length"):args.index("--t5xxl_max_token_length") + 2]
    trainer, code = cli_runs.run_trainer("network", args)
    assert code == 0
    assert trainer.models.variant.name == "schnell" and trainer.models.tokenizer.t5_max_length == 256
    seen = []
    hook = trainer.models.flux.register_forward_pre_hook(
        lambda module, a, kw: seen.append((float(kw["timesteps"][0]), kw["txt"].shape[1])), with_kwargs=True)
    try:
        trainer.samples.run(trainer, step=2)
    finally:
        hook.remove()
    # 4 steps on the plain linear grid 1 -> 0 (BFL's schnell schedule): no resolution shift
    assert [t for t, _ in seen] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert get_schedule(4, 16, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert get_schedule(4, 16, shift=True)[1] != pytest.approx(0.75)  # what dev's shift would have done
    assert {n for _, n in seen} == {256}
    png = next((tmp_path / "out" / "sample").glob("*.png"))
    from PIL import Image
    with Image.open(png) as im:
        assert im.text["steps"] == "4" and im.text["model"] == "flux-1-schnell"
