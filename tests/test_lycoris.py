"""LyCORIS adapters: `--network_module lycoris.kohya` through flux_train_network.py, and LoKr/LoHa/LoCon files in our
inference, merge tool and converters (their updates by the formulas ComfyUI's loader uses)."""

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from tools.make_demo_dataset import make_demo_dataset
from tools.make_tiny_models import make_tiny_models

lycoris_kohya = pytest.importorskip("lycoris.kohya")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

run_trainer = partial(cli_runs.run_trainer, "network")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lycoris")
    models = make_tiny_models(base / "models")
    toml = make_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def lycoris_args(setup, out, algo="lokr", *extra):
    return [*run_args(*setup, out), "--network_module", "lycoris.kohya", "--network_dim", "4",
            "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "4", "--optimizer_type", "AdamW",
            "--max_grad_norm", "0", "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
            "--network_args", f"algo={algo}", "factor=4", *extra]


def test_cli_lokr_equals_a_plain_loop_with_the_same_lycoris_modules(setup, tmp_path, monkeypatch):
    """The CLI's LoKr after 4 AdamW steps equals lycoris' own modules trained by a hand-written loop (flux forward,
    MSE to noise - latents, AdamW) on the batches, noise and sigmas the CLI drew, bit for bit: the trainer
    adds nothing."""
    from library.flux_utils import load_flow_model
    from library.models.packing import pack_latents, prepare_img_ids, unpack_latents
    from library.training import loss as loss_module
    from library.training.recipes.lora import LoRATrainer

    steps, texts, initial = [], [], {}
    original_noisy, original_text = loss_module.noisy_input, loss_module.FluxLossComputer.text
    monkeypatch.setattr(loss_module, "noisy_input", lambda latents, noise, sigmas, *a: (
        steps.append({"latents": latents.clone(), "noise": noise.clone(), "sigmas": sigmas.clone()})
        or original_noisy(latents, noise, sigmas, *a)))
    monkeypatch.setattr(loss_module.FluxLossComputer, "text", lambda self, batch: (
        lambda text: texts.append(text) or text)(original_text(self, batch)))
    original_build = LoRATrainer.build_trainable

    def build_and_keep_initial(self, models):
        trainable = original_build(self, models)
        initial.update({k: v.detach().clone() for k, v in self.network.state_dict().items()})
        return trainable

    monkeypatch.setattr(LoRATrainer, "build_trainable", build_and_keep_initial)
    _, code = run_trainer(lycoris_args(setup, tmp_path))
    assert code == 0 and len(steps) == 4
    cli_weights = load_file(str(tmp_path / "last.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1" in cli_weights

    _, flux = load_flow_model(setup[0]["flux"], torch.float32, "cpu")
    flux.requires_grad_(False)
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, flux, algo="lokr", factor="4")
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    network.load_state_dict(initial)
    params, _ = network.prepare_optimizer_params(None, None, 1e-2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for s, text in zip(steps, texts, strict=True):
        x0, noise, sigma = s["latents"], s["noise"], s["sigmas"]
        b, _, h, w = x0.shape
        t = sigma.view(-1, 1, 1, 1)
        pred = flux(img=pack_latents((1 - t) * x0 + t * noise), img_ids=prepare_img_ids(b, h // 2, w // 2),
                    txt=text.t5_out, txt_ids=text.txt_ids, timesteps=sigma, y=text.l_pooled,
                    guidance=torch.full((b,), 3.5))  # --guidance_scale default
        loss = torch.nn.functional.mse_loss(unpack_latents(pred, h // 2, w // 2), noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    plain = {k: v.detach() for k, v in network.state_dict().items()}
    assert plain.keys() == cli_weights.keys()
    assert all(torch.equal(plain[k], cli_weights[k]) for k in plain), "the trainer changed what lycoris trains"
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain)
    assert moved > 1e-3  # the comparison is of trained weights, not of two untouched initialisations
