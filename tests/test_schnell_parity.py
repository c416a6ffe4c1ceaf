"""FLUX.1-schnell against diffusers on tiny weights: the transformer loaded from a BFL file equals
FluxTransformer2DModel(guidance_embeds=False), and our sampler equals FluxPipeline configured as schnell.

The step grids are comparable here: BFL's schnell schedule is linspace(1, 0, N + 1) unshifted, and diffusers'
FluxPipeline takes sigmas linspace(1, 1/N, N) and appends the terminal 0, which with shift 1.0 and no dynamic
shifting is the same grid. (For the shifted models both shift the same points with the same mu formula; diffusers'
mu comes from the packed latent length, ours from the target token count: equal for text-to-image.)
"""

import pytest
import torch

from library import flux_utils
from library.flow.generation import FluxModels, GenerationSettings, Placement, generate_latents
from library.flow.sampling import Conditioning, get_noise, get_schedule, packed_grid, prepare_txt_ids
from library.models.packing import pack_latents
from library.models.variants import VARIANTS
from model_helpers import diffusers_reference, flux_inputs, run
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    files = make_tiny_models(tmp_path_factory.mktemp("schnell"), preset="tiny-schnell")
    is_schnell, flux = flux_utils.load_flow_model(files["flux"], torch.float32, "cpu")
    assert is_schnell and not flux.params.guidance_embed
    return flux.eval()


def test_loaded_schnell_transformer_equals_diffusers_without_guidance_embeds(schnell):
    reference = diffusers_reference(schnell)
    assert reference.config.guidance_embeds is False
    inputs = flux_inputs(schnell, batch=2)
    ours = run(schnell, {**inputs, "guidance": None})
    with torch.no_grad():
        theirs = reference(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                           pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                           txt_ids=inputs["txt_ids"][0], guidance=None, return_dict=False)[0]
    assert (ours - theirs).abs().max() < 2e-5
    assert torch.equal(ours, run(schnell, inputs))  # a guidance value given anyway changes nothing


def schnell_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # FLUX.1-schnell's scheduler config: shift 1.0, no resolution-dependent (dynamic) shifting
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def test_schnell_sampler_equals_diffusers_flux_pipeline(schnell):
    width = height = 64
    h, w = packed_grid(height, width)
    g = torch.Generator().manual_seed(4)
    p = schnell.params
    txt, y = torch.randn(1, 8, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    models = FluxModels(schnell, None, None, None, None, VARIANTS["schnell"], torch.float32)
    settings = GenerationSettings(prompt="", width=width, height=height, seed=9)  # steps: the model's 4
    ours = generate_latents(models, settings, Conditioning(txt, y, prepare_txt_ids(1, 8)), None,
                            Placement("cpu", offload=False), progress=False)

    pipe = schnell_pipeline(diffusers_reference(schnell))
    theirs = pipe(prompt_embeds=txt, pooled_prompt_embeds=y, latents=get_noise(1, height, width, 9),
                  height=height, width=width, num_inference_steps=VARIANTS["schnell"].steps, guidance_scale=0.0,
                  output_type="latent", return_dict=False)[0]
    # the grid diffusers stepped on is ours (its sigmas end with the appended terminal 0)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(get_schedule(4, h * w, shift=False))
    assert theirs.shape == (1, h * w, 64)
    assert (pack_latents(ours) - theirs).abs().max() < 1e-4
    assert (pack_latents(ours) - get_noise(1, height, width, 9)).abs().max() > 0.1  # it did denoise
