"""Chroma under the memory features: block swapping (forward, backward, trained weights) and gradient
checkpointing give the same numbers as the plain model, on CPU (separate storage and slot memory, as in
tests/test_block_swap.py)."""

import copy

import pytest
import torch

from library.memory.block_swap import enable_flux_block_swap
from library.memory.checkpointing import enable_gradient_checkpointing, is_gradient_checkpointing
from library.models.chroma import Chroma, params_with_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = params_with_overrides("tiny", depth=4, depth_single_blocks=8)  # up to 5 blocks to swap


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    b, n, l = 2, 16, 8
    ids = torch.zeros(b, n, 3)
    ids[..., 1] = torch.arange(n).div(4, rounding_mode="floor")
    ids[..., 2] = torch.arange(n) % 4
    mask = torch.zeros(b, l, dtype=torch.long)
    mask[0, :3], mask[1, :6] = 1, 1
    return dict(img=torch.randn(b, n, 64, generator=g), img_ids=ids, txt=torch.randn(b, l, 64, generator=g),
                txt_ids=torch.zeros(b, l, 3), timesteps=torch.rand(b, generator=g), y=None,
                guidance=torch.zeros(b), txt_attention_mask=mask)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Chroma(PARAMS).eval()


@pytest.mark.parametrize("n,checkpointing", [(1, False), (5, False), (3, True), (2, "cpu_offload")])
def test_full_fine_tune_steps_equal_with_block_swap(base, n, checkpointing):
    ref = copy.deepcopy(base).train()
    model = copy.deepcopy(base)
    if checkpointing:
        enable_gradient_checkpointing(model, cpu_offload=checkpointing == "cpu_offload")
        assert is_gradient_checkpointing(model) and is_gradient_checkpointing(model.distilled_guidance_layer)
    swappers = enable_flux_block_swap(model, n, "cpu", "cpu", host_to_device_only=False)
    model.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    for step in range(3):
        losses = []
        for m, opt in zip((ref, model), opts):
            loss = m(**_inputs(step)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
        assert torch.equal(*losses), step
    want, got = ref.state_dict(), model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(want[k], base.state_dict()[k]) for k in want)
    for s in swappers:
        assert s.resident() == s.schedule.initial


@pytest.mark.parametrize("n", [2, 5])
def test_frozen_swapped_forward_and_input_gradients_equal(base, n):
    """A frozen base (LoRA's case): host-to-device-only swapping, outputs and input gradients unchanged."""
    model = copy.deepcopy(base)
    enable_flux_block_swap(model, n, "cpu", "cpu")
    grads = []
    for m in (base, model):
        m.requires_grad_(False)
        inputs = _inputs()
        inputs["img"].requires_grad_(True)
        out = m(**inputs)
        out.square().mean().backward()
        grads.append((out.detach(), inputs["img"].grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --- the memory planner ---------------------------------------------------------------------------------------------


def test_planner_prediction_matches_a_real_cpu_step_for_chroma():
    from library.planner.plan import PlanSettings, plan_memory
    from library.planner.report import measure_cpu_step

    s = PlanSettings(model="test", params=PARAMS, width=128, height=128, t5_tokens=64, mixed_precision="no",
                     target="cpu", blocks_to_swap=2, fp8_base=True)
    plan = plan_memory(s)
    measured = measure_cpu_step(s)
    assert plan.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.10)


def test_planner_counts_chromas_own_weights_and_no_clip():
    from library.models.chroma import CHROMA_PRESETS
    from library.models.transformer import FLUX_PRESETS, Flux
    from library.planner.plan import _encoder_bytes, plan_memory, settings_from_args
    from library.training.arguments import training_parser
    from library.training.recipes.command_lines import LORA

    with torch.device("meta"):
        chroma_params = sum(p.numel() for p in Chroma(CHROMA_PRESETS["chroma"]).parameters())
        dev_params = sum(p.numel() for p in Flux(FLUX_PRESETS["dev"]).parameters())
    assert 8.7e9 < chroma_params < 8.95e9 and dev_params - chroma_params > 3e9  # no modulation Linears
    argv = ["--resolution", "512", "--mixed_precision", "bf16", "--gradient_checkpointing", "--network_dim", "4",
            "--cache_latents", "--t5xxl_max_token_length", "64"]
    parse = training_parser(LORA).parse_args
    args = parse(argv)
    args.model_preset = "chroma"  # tools/plan_memory.py's option
    chroma = settings_from_args(args)
    args.model_preset = "dev"
    dev = settings_from_args(args)
    assert chroma.apply_t5_attn_mask and chroma.clip_l_params == 0 and dev.clip_l_params > 0
    assert _encoder_bytes(chroma) == chroma.t5xxl_params * 2 < _encoder_bytes(dev)  # T5 only, bf16
    plan = plan_memory(chroma)
    assert plan.parts["resident_base_weights"] == pytest.approx(chroma_params * 2, rel=0.001)


def test_blocks_to_swap_auto_plans_a_chroma_file(tmp_path):
    from dataclasses import replace

    from library.formats.safetensors_io import save_file_atomic
    from library.planner.plan import GIB, PlanSettings, choose_blocks_to_swap, plan_many
    from library.training.arguments import training_parser
    from library.training.recipes.command_lines import LORA

    path = tmp_path / "chroma.safetensors"
    save_file_atomic({k: v.to(torch.bfloat16) for k, v in Chroma(PARAMS).state_dict().items()}, path)
    toml = tmp_path / "dataset.toml"  # read for its sizes only
    toml.write_text('[general]\nresolution = 128\n[[datasets]]\nbatch_size = 1\n'
                    '  [[datasets.subsets]]\n  image_dir = "missing"\n')
    argv = ["--pretrained_model_name_or_path", str(path), "--dataset_config", str(toml), "--mixed_precision", "bf16",
            "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents", "--network_dim", "4",
            "--optimizer_type", "AdamW", "--t5xxl_max_token_length", "64", "--blocks_to_swap", "auto",
            "--model_type", "chroma"]
    args = training_parser(LORA).parse_args(argv)
    base = PlanSettings(model=str(path), params=PARAMS, width=128, height=128, t5_tokens=64, network_dim=4,
                        network_alpha=1.0, optimizer_type="AdamW", apply_t5_attn_mask=True, clip_l_params=0)
    peaks = [p.peak_bytes for p in plan_many([replace(base, blocks_to_swap=n) for n in range(4)])]
    assert peaks[0] > peaks[1] > peaks[3]
    args.vram_budget_gb = (peaks[1] + peaks[2]) / 2 / GIB
    assert choose_blocks_to_swap(args) == 2
