"""ostris Flex.2-preview: recognition, the 196-feature transformer against diffusers, the condition builder (golden
values by hand), the control_stop switch and the bypassed guidance embedder (library/models/flex2.py)."""

from dataclasses import replace

import pytest
import torch

from library.formats.diffusers_keys import bfl_to_diffusers
from library.formats.safetensors_io import save_file_atomic
from library.flow.sampling import get_schedule
from library.memory.block_swap import split_blocks_to_swap, swap_schedule
from library.models.checkpoint import analyze_checkpoint, load_transformer
from library.models.conditioned import ExtraChannelsFlux
from library.models.flex2 import (FLEX2_EXTRA_CHANNELS, FLEX2_IN_CHANNELS, Flex2Condition, control_stop_step,
                                  control_stop_threshold, flex2_features, inpaint_channels, sampling_condition)
from library.models.packing import pack_latents
from library.models.transformer import Flux, params_with_overrides
from library.models.variants import VARIANTS, resolve_variant
from model_helpers import diffusers_reference, flux_inputs


def tiny_flex2(depth=2, single=2) -> Flux:
    torch.manual_seed(0)
    return Flux(params_with_overrides("tiny", in_channels=FLEX2_IN_CHANNELS, depth=depth,
                                      depth_single_blocks=single)).eval()


def test_the_flex2_row_and_recognition_from_the_keys():
    flex = VARIANTS["flex2"]
    assert (flex.in_channels, flex.architecture, flex.licence) == (196, "flex-2-preview", "Apache-2.0")
    assert (flex.steps, flex.guidance, flex.training_guidance) == (50, 3.5, None)
    assert FLEX2_IN_CHANNELS == (3 * 16 + 1) * 4 and FLEX2_EXTRA_CHANNELS == 132
    assert resolve_variant(None, has_guidance_input=True, in_channels=196).name == "flex2"
    assert resolve_variant("flex2", has_guidance_input=True, in_channels=196).name == "flex2"
    with pytest.raises(ValueError, match="its img_in takes 64 features per token, flex2 takes 196"):
        resolve_variant("flex2", has_guidance_input=True, in_channels=64, source="flux1-dev.safetensors")
    with pytest.raises(ValueError, match="its img_in takes 196 features per token, dev takes 64"):
        resolve_variant("dev", has_guidance_input=True, in_channels=196, source="Flex.2-preview.safetensors")


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_file_with_8_double_blocks_is_read_with_its_own_depth(tmp_path, layout):
    """Flex.2 has 8 double + 38 single blocks: every size comes from the file (here 3 + 5, tiny)."""
    flux = tiny_flex2(depth=3, single=5)
    sd = flux.state_dict()
    if layout == "bfl":
        path = tmp_path / "Flex.2-preview.safetensors"
        save_file_atomic(sd, path)
    else:
        path = tmp_path / "transformer"
        path.mkdir()
        save_file_atomic(bfl_to_diffusers(sd, flux.params.hidden_size), path / "diffusion_pytorch_model.safetensors")
    info = analyze_checkpoint(path)
    assert (info.params.depth, info.params.depth_single_blocks, info.params.in_channels) == (3, 5, 196)
    assert resolve_variant(None, has_guidance_input=info.params.guidance_embed,
                           in_channels=info.params.in_channels).name == "flex2"
    loaded = load_transformer(path, torch.float32, "cpu").eval()
    inputs = flux_inputs(flux)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), flux(**inputs))
    # block swapping splits and schedules the file's stacks, not FLUX.1-dev's 19/38
    assert split_blocks_to_swap(2, 3, 5) == (1, 2)
    with pytest.raises(ValueError):
        split_blocks_to_swap(6, 3, 5)
    assert swap_schedule(3, 1).num_blocks == 3


def test_tiny_flex2_equals_diffusers_with_the_same_weights():
    """A 196-feature, 2-double-block model against diffusers' FluxTransformer2DModel(in_channels=196,
    num_layers=2), the weights converted by our key table."""
    flux = tiny_flex2()
    reference = diffusers_reference(flux)
    assert reference.config.in_channels == 196 and reference.config.num_layers == 2
    inputs = flux_inputs(flux)
    with torch.no_grad():
        ours = flux(**inputs)
        theirs = reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                           pooled_projections=inputs["y"], timestep=inputs["timesteps"],
                           img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"],
                           return_dict=False)[0]
    assert ours.shape == (2, 16, 64)
    assert (ours - theirs).abs().max() < 2e-5


def test_bypassed_guidance_is_the_vector_without_the_guidance_term():
    flux = tiny_flex2()
    inputs = flux_inputs(flux)
    with torch.no_grad():
        plain = flux(**inputs)
        bypassed = flux(**inputs, bypass_guidance=True)
        other = flux(**{**inputs, "guidance": torch.full((2,), 7.0)}, bypass_guidance=True)
        vec = flux.conditioning_vector(inputs["timesteps"], inputs["y"], bypass_guidance=True)
        by_hand = flux.time_in(__import__("library.models.flux_math", fromlist=["x"]).timestep_embedding(
            inputs["timesteps"], 256)) + flux.vector_in(inputs["y"])
        # the guidance embedder's weights zeroed: then the ordinary forward equals the bypassed one
        for p in flux.guidance_in.out_layer.parameters():
            p.zero_()
        zeroed = flux(**inputs)
    assert torch.equal(bypassed, other) and not torch.allclose(plain, bypassed)
    assert torch.allclose(vec, by_hand, atol=1e-6)
    assert torch.allclose(zeroed, bypassed, atol=1e-6)


def test_condition_builder_golden_values():
    """The 49-channel layout by hand on a 1x2x2 latent grid (one token): [noisy | inpaint 16 | mask 1 | control 16],
    packed channel-major (feature 4c + 2*row + col)."""
    lat = torch.arange(16 * 4, dtype=torch.float32).reshape(1, 16, 2, 2) + 1  # values 1..64
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # generate the top-left and bottom-right latent pixels
    control = torch.full((1, 16, 2, 2), 2.0)
    inpaint = inpaint_channels(lat, mask, lat.shape)
    feats = flex2_features(inpaint, control * 0.5)
    assert feats.shape == (1, 1, 132)
    f = feats[0, 0]
    # channel 0 of the inpaint latent: [[1, 2], [3, 4]] with the masked pixels zeroed -> [0, 2, 3, 0]
    assert f[0:4].tolist() == [0.0, 2.0, 3.0, 0.0]
    # channel 15: [[61, 62], [63, 64]] -> [0, 62, 63, 0]
    assert f[60:64].tolist() == [0.0, 62.0, 63.0, 0.0]
    assert f[64:68].tolist() == [1.0, 0.0, 0.0, 1.0]  # the mask channel, 1 = generate
    assert f[68:].tolist() == [1.0] * 64  # control 2.0 x strength 0.5
    # no inpainting: zeros and an all-ones mask; no control: zeros
    empty = flex2_features(inpaint_channels(None, None, lat.shape), torch.zeros(1, 16, 2, 2))[0, 0]
    assert empty[:64].abs().sum() == 0 and empty[64:68].tolist() == [1.0] * 4 and empty[68:].abs().sum() == 0
    # the same as packing the 33 channels at once (ai-toolkit packs [inpaint | mask] and control separately)
    assert torch.equal(feats, pack_latents(torch.cat((inpaint, control * 0.5), dim=1)))


def test_the_mask_is_resized_to_the_latent_grid_and_zeroes_in_latent_space():
    lat = torch.ones(1, 16, 4, 4)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1  # top half of the picture: generate
    inpaint = inpaint_channels(lat, mask, lat.shape)
    assert inpaint[0, :16, :2].abs().sum() == 0 and torch.equal(inpaint[0, :16, 2:], torch.ones(16, 2, 4))
    assert torch.equal(inpaint[0, 16], torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4] * 2))
    with pytest.raises(ValueError, match="needs its mask"):
        inpaint_channels(lat, None, lat.shape)


def test_control_stop_switches_the_control_off_at_the_right_step_of_10():
    schedule = get_schedule(10, 256, shift=True)
    assert control_stop_step(10, 0.5) == 4 and control_stop_step(10, 1.0) == 9 and control_stop_step(10, 0.0) == 0
    shape = (1, 16, 2, 2)
    cond = sampling_condition(None, None, torch.ones(1, 16, 2, 2), shape, strength=0.5, stop=0.5, schedule=schedule)
    seen = []
    for t in schedule[:-1]:  # the sampler's calls, with t in bf16 as the compute dtype gives it
        features = cond(torch.tensor([t], dtype=torch.bfloat16))
        seen.append(bool(features[0, 0, 68:].abs().sum() > 0))
        assert features[0, 0, 64:68].tolist() == [1.0] * 4  # the inpaint part stays
    assert seen == [True] * 5 + [False] * 5
    assert control_stop_threshold(schedule, 1.0) < schedule[-2]  # stop 1: every step sees the control
    # per sample of a batch (classifier-free guidance runs two)
    both = cond(torch.tensor([schedule[0], schedule[9]]))
    assert both[0, 0, 68:].sum() > 0 and both[1, 0, 68:].sum() == 0
    with pytest.raises(ValueError, match="control_stop 1.5"):
        control_stop_step(10, 1.5)


def test_the_bound_condition_drives_extra_channels_flux_step_by_step():
    flux = tiny_flex2()
    inputs = flux_inputs(flux, batch=1, n_img=4)
    img = inputs["img"][..., :64]
    schedule = [1.0, 0.75, 0.5, 0.25, 0.0]
    cond = sampling_condition(None, None, torch.randn(1, 16, 4, 4), (1, 16, 4, 4), strength=0.5, stop=0.5,
                              schedule=schedule)  # 4 steps: control on steps 0 and 1
    model = ExtraChannelsFlux(flux).bind(cond)
    with torch.no_grad():
        for t, on in zip(schedule[:-1], (True, True, False, False)):
            ts = torch.tensor([t])
            features = cond._with if on else cond._without
            direct = flux(**{**inputs, "img": torch.cat((img, features), -1), "timesteps": ts})
            assert torch.equal(model(**{**inputs, "img": img, "timesteps": ts}), direct)


def test_condition_is_a_dataclass_of_its_parts():
    cond = Flex2Condition(torch.zeros(1, 17, 2, 2), torch.ones(1, 16, 2, 2))
    assert cond.uses_control(0.0) and replace(cond, stop_below=0.5).uses_control(0.4) is False
