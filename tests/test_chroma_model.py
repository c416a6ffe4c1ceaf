"""Chroma's transformer (library/models/chroma.py) against diffusers' ChromaTransformer2DModel, with diffusers' own
single-file converter mapping our BFL-layout state dict, so the key map is checked independently."""

from __future__ import annotations

import types

import pytest
import torch

from library.models.chroma import CHROMA_PRESETS, Chroma, chroma_text_mask
from library.models.packing import prepare_img_ids
from library.models.transformer import DoubleStreamBlock, SingleStreamBlock

diffusers = pytest.importorskip("diffusers")
from diffusers import ChromaTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402

P = CHROMA_PRESETS["tiny"]


def tiny_chroma(seed: int = 0) -> Chroma:
    torch.manual_seed(seed)
    model = Chroma(P)
    with torch.no_grad():  # non-trivial norm scales and biases, so a swapped key would show
        for name, t in model.named_parameters():
            t.copy_(torch.randn_like(t) * (0.3 if t.dim() > 1 else 0.1) + (1.0 if name.endswith("scale") else 0.0))
    return model.eval()


def _scaled_split_torch(hidden: int, mlp_hidden: int):
    """diffusers' Chroma converter hard-codes FLUX.1's widths (3072, MLP 12288) when it splits a single block's
    linear1; this stand-in for its `torch` scales those split sizes to the tiny width and changes nothing else."""

    def split(tensor, sizes, dim=0):
        sizes = [{3072: hidden, 12288: mlp_hidden}.get(s, s) for s in sizes]
        return torch.split(tensor, sizes, dim=dim)

    class TorchWithScaledSplit(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    stand_in = TorchWithScaledSplit("torch")
    stand_in.split = split
    return stand_in


def diffusers_twin(model: Chroma) -> ChromaTransformer2DModel:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    real_torch = single_file_utils.torch
    single_file_utils.torch = _scaled_split_torch(P.hidden_size, P.mlp_hidden_dim)
    try:
        converted = single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers(sd)
    finally:
        single_file_utils.torch = real_torch
    assert not sd, f"keys the converter did not take: {sorted(sd)}"
    twin = ChromaTransformer2DModel(
        num_layers=P.depth, num_single_layers=P.depth_single_blocks, attention_head_dim=P.head_dim,
        num_attention_heads=P.num_heads, joint_attention_dim=P.context_in_dim, axes_dims_rope=P.axes_dim,
        approximator_num_channels=P.approximator_in_dim, approximator_hidden_dim=P.approximator_hidden_size,
        approximator_layers=P.approximator_depth)
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    for norm in twin.distilled_guidance_layer.norms:  # lodestones' RMSNorm: eps 1e-6 (torch's default is finfo.eps)
        norm.eps = 1e-6
    return twin.eval()


def test_modulation_count_and_layout():
    full = CHROMA_PRESETS["chroma"]
    assert full.mod_index_length == 344
    model = Chroma(P)
    keys = set(model.state_dict())
    assert "distilled_guidance_layer.in_proj.weight" in keys and "distilled_guidance_layer.norms.0.scale" in keys
    assert not any(k.startswith(("time_in", "vector_in", "guidance_in")) for k in keys)
    assert not any("_mod." in k or ".modulation." in k or "adaLN" in k for k in keys)
    assert isinstance(model.double_blocks[0], DoubleStreamBlock) and isinstance(model.single_blocks[0],
                                                                                  SingleStreamBlock)
    assert not any(isinstance(m, torch.nn.Linear) and "mod" in n for n, m in model.named_modules())


def test_text_mask_attends_one_padding_token():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert chroma_text_mask(mask).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_forward_equals_diffusers(guidance):
    model = tiny_chroma()
    twin = diffusers_twin(model)
    torch.manual_seed(1)
    b, h, w, L = 2, 4, 6, 12
    img = torch.randn(b, h * w, 64)
    img_ids = prepare_img_ids(b, h, w)
    txt = torch.randn(b, L, P.context_in_dim)
    txt_ids = torch.zeros(b, L, 3)
    t = torch.tensor([0.8, 0.3])
    t5_mask = torch.zeros(b, L, dtype=torch.long)
    t5_mask[0, :5] = 1
    t5_mask[1, :9] = 1
    with torch.no_grad():
        ours = model(img, img_ids, txt, txt_ids, t, None, torch.full((b,), guidance), t5_mask)
        # diffusers takes the text mask as its pipeline builds it (tokens + one padding token) over [txt; img],
        # boolean: SDPA reads a float 0/1 mask -- what ChromaPipeline itself passes -- as an additive bias, which
        # masks nothing (diffusers issues 11724, 12116, 13619)
        joint = torch.cat([chroma_text_mask(t5_mask), torch.ones(b, h * w, dtype=torch.bool)], dim=1)
        if guidance == 0.0:  # diffusers always embeds guidance 0
            theirs = twin(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=img_ids[0],
                          txt_ids=txt_ids[0], attention_mask=joint, return_dict=False)[0]
            # fp32 rounding only: outputs reach ~260 with these weights, both sit ~3e-4 from a float64 run
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * float(ours.abs().max()))
            torch.testing.assert_close(model.modulation_vectors(t, torch.zeros(b)),
                                       twin.distilled_guidance_layer(twin.time_text_embed(t * 1000)))
        else:  # the guidance value reaches the approximator: the output moves
            zero = model(img, img_ids, txt, txt_ids, t, None, torch.zeros(b), t5_mask)
            assert (ours - zero).abs().max() > 1e-4


def test_padding_beyond_the_first_does_not_matter_and_trimming_is_exact():
    model = tiny_chroma()
    b, L = 1, 10
    img, img_ids = torch.randn(b, 8, 64), prepare_img_ids(b, 2, 4)
    txt = torch.randn(b, L, P.context_in_dim)
    mask = torch.zeros(b, L, dtype=torch.long)
    mask[:, :4] = 1
    t = torch.tensor([0.5])
    with torch.no_grad():
        out = model(img, img_ids, txt, torch.zeros(b, L, 3), t, None, None, mask)
        changed = txt.clone()
        changed[:, 5:] = 100.0  # beyond the first padding token
        same = model(img, img_ids, changed, torch.zeros(b, L, 3), t, None, None, mask)
        first_pad = txt.clone()
        first_pad[:, 4] = 100.0  # the attended padding token
        moved = model(img, img_ids, first_pad, torch.zeros(b, L, 3), t, None, None, mask)
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    assert (out - moved).abs().max() > 1e-3


def test_full_size_layout_is_what_diffusers_converts_and_loads():
    """Chroma's released layout at full size, on `meta`: diffusers' converter takes every key and its default
    ChromaTransformer2DModel (Chroma1-HD's config) takes every converted tensor with its shape."""
    with torch.device("meta"):
        sd = Chroma(CHROMA_PRESETS["chroma"]).state_dict()
        converted = single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers(dict(sd))
        twin = ChromaTransformer2DModel()
    assert len(sd) == len([k for k in sd if k.startswith(("double_blocks.", "single_blocks."))]) + 4 + 4 + 2 + 5 * 5 \
        and sum(1 for k in sd if k.startswith("double_blocks.0.")) == 20
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_tiny_file_is_recognised_and_loads(tmp_path):
    from library.memory.loading import load_for_compute
    from library.models.checkpoint import analyze_checkpoint, load_transformer
    from tools.make_tiny_models import main

    assert main(["--out", str(tmp_path), "--model_type", "chroma"]) == 0  # the command line
    paths = {"flux": tmp_path / "flux.safetensors"}
    info = analyze_checkpoint(paths["flux"])
    assert info.metadata["modelspec.architecture"] == "chroma"
    assert (info.family, info.model_type, info.is_schnell, info.has_guidance_input) == ("chroma", "chroma", False, True)
    assert (info.params.depth, info.params.depth_single_blocks, info.params.approximator_depth) == (2, 2, 2)
    model = load_transformer(paths["flux"], torch.float32)
    assert isinstance(model, Chroma) and model.params == info.params
    fp8 = load_for_compute("flux", paths["flux"], "fp8", "cpu", compute_dtype=torch.float32)
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    b, L = 1, 8
    args = (torch.randn(b, 4, 64), prepare_img_ids(b, 2, 2), torch.randn(b, L, info.params.context_in_dim),
            torch.zeros(b, L, 3), torch.tensor([0.6]), None, torch.zeros(b), torch.ones(b, L, dtype=torch.long))
    with torch.no_grad():
        exact, stored = model(*args), fp8(*args)
    assert torch.isfinite(stored).all() and (exact - stored).abs().max() < 0.1 * exact.abs().max()


def test_model_type_mismatch_is_one_line_naming_both():
    from library.models.variants import VARIANTS, resolve_variant

    assert resolve_variant(None, has_guidance_input=True, family="chroma") is VARIANTS["chroma"]
    assert resolve_variant("chroma", has_guidance_input=True, family="chroma") is VARIANTS["chroma"]
    with pytest.raises(ValueError, match=r"--model_type chroma expects a chroma transformer.*flux keys"):
        resolve_variant("chroma", has_guidance_input=True, family="flux", source="flux.safetensors")
    with pytest.raises(ValueError, match=r"--model_type dev expects a flux transformer.*chroma keys.*chroma"):
        resolve_variant("dev", has_guidance_input=True, family="chroma", source="chroma.safetensors")


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sampler_equals_diffusers_chroma_pipeline(cfg_scale):
    """Our Euler loop and schedule (library/flow/sampling.py) against ChromaPipeline (output_type="latent") with the
    same tiny weights, fixed packed latents, given T5 outputs and masks, and the FLUX scheduler config (dynamic shift
    from the image's token count). The pipelines' schedules agree by design: diffusers' sigmas linspace(1, 1/N, N)
    plus the terminal 0 are BFL's linspace(1, 0, N + 1), shifted by the same formula."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from library.flow.sampling import Conditioning, denoise, get_schedule

    model = tiny_chroma()
    twin = diffusers_twin(model)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=twin)
    torch.manual_seed(2)
    height, width, steps, L = 64, 96, 4, 10  # 4 x 6 tokens
    latents = torch.randn(1, 24, 64)
    pos, neg = torch.randn(1, L, P.context_in_dim), torch.randn(1, L, P.context_in_dim)
    pos_mask, neg_mask = torch.zeros(1, L, dtype=torch.long), torch.zeros(1, L, dtype=torch.long)
    pos_mask[:, :6], neg_mask[:, :2] = 1, 1
    theirs = pipe(prompt_embeds=pos, prompt_attention_mask=chroma_text_mask(pos_mask),
                  negative_prompt_embeds=neg, negative_prompt_attention_mask=chroma_text_mask(neg_mask),
                  height=height, width=width, num_inference_steps=steps, guidance_scale=cfg_scale,
                  latents=latents.clone(), output_type="latent", return_dict=False)[0]
    ids = torch.zeros(1, L, 3)
    cond, negative = (Conditioning(t, torch.zeros(1, 768), ids, m) for t, m in ((pos, pos_mask), (neg, neg_mask)))
    timesteps = get_schedule(steps, 24, shift=True)
    expected = pipe.scheduler.sigmas.tolist()  # the schedule diffusers just ran
    assert timesteps == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        ours = denoise(model, latents.clone(), prepare_img_ids(1, 4, 6), cond, timesteps, 0.0,
                       negative if cfg_scale != 1.0 else None, cfg_scale)
    assert (ours - latents).abs().max() > 0.1  # it moved
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(ours.abs().max()))


def test_gguf_chroma_loads_quantized(tmp_path):
    pytest.importorskip("gguf")
    from library.memory.gguf_linear import GGUFLinear
    from library.memory.loading import load_for_compute
    from library.models.checkpoint import analyze_checkpoint, load_transformer
    from tools.make_tiny_models import make_tiny_models

    paths = make_tiny_models(tmp_path, model_type="chroma", gguf_type="Q8_0")
    info = analyze_checkpoint(paths["flux_gguf"])
    assert (info.layout, info.family) == ("gguf", "chroma")
    quantized = load_for_compute("flux", paths["flux_gguf"], torch.float32, "cpu", info=info)
    assert isinstance(quantized, Chroma) and isinstance(quantized.double_blocks[0].img_attn.qkv, GGUFLinear)
    exact = load_transformer(paths["flux"], torch.float32)
    b, L = 1, 6
    args = (torch.randn(b, 4, 64), prepare_img_ids(b, 2, 2), torch.randn(b, L, info.params.context_in_dim),
            torch.zeros(b, L, 3), torch.tensor([0.4]), None, torch.zeros(b), torch.ones(b, L, dtype=torch.long))
    with torch.no_grad():
        a, q = exact(*args), quantized(*args)
    assert (a - q).abs().max() < 0.02 * a.abs().max()


def test_variant_defaults_are_chroma_pipelines():
    import inspect

    from diffusers import ChromaPipeline

    from library.models.variants import VARIANTS

    v = VARIANTS["chroma"]
    call = inspect.signature(ChromaPipeline.__call__).parameters
    assert v.steps == call["num_inference_steps"].default == 35
    assert v.cfg_scale == call["guidance_scale"].default == 5.0
    assert v.t5_max_length == call["max_sequence_length"].default == 512
    assert (v.family, v.architecture, v.guidance, v.training_guidance, v.shift) == ("chroma", "chroma", 0.0, 0.0, True)
    assert v.t5_attn_mask and v.licence == "Apache-2.0" and v.modelspec_architecture(lora=True) == "chroma/lora"


def test_text_encoding_equals_chroma_pipelines(tmp_path):
    """T5 run with the tokenizer mask; the tokens and the first padding position kept (its T5 output, which the
    transformer attends), the rest zero: the same embeddings and mask as ChromaPipeline._get_t5_prompt_embeds."""
    from diffusers import ChromaPipeline

    from library.models import loading
    from library.models.chroma import NoCLIP
    from library.models.text_encoding import encode_prompts
    from tools.make_tiny_models import make_tiny_models

    paths = make_tiny_models(tmp_path, model_type="chroma")
    t5 = loading.load_t5xxl(paths["t5xxl"], torch.float32, "cpu").eval()
    tokenizer = loading.load_tokenizer(paths["tokenizers"], t5xxl_max_token_length=16)
    prompts = ["a red circle", "two small blue squares on a white ground"]
    clip_ids, t5_ids, t5_mask = tokenizer(prompts)
    with torch.no_grad():
        _, ours, _, mask = encode_prompts(NoCLIP(), t5, clip_ids, t5_ids, t5_mask, apply_t5_attn_mask=True)
        pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=t5, tokenizer=tokenizer.t5_tokenizer,
                              transformer=None)
        theirs, their_mask = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=16, device=torch.device("cpu"),
                                                        dtype=torch.float32)
    kept = chroma_text_mask(mask)
    assert torch.equal(kept, their_mask.bool()) and not kept.all()
    torch.testing.assert_close(ours[kept], theirs[kept])
    assert ours[~kept].abs().max() == 0 and ours[kept].abs().min() > 0  # the first padding position kept


def test_flux_with_the_t5_mask_never_reads_padding_positions():
    """Why keeping the first padding position's T5 output changes nothing for FLUX.1: its attention masks every
    padding key, so the image tokens come out bit for bit the same whatever those positions hold."""
    from library.models.transformer import FLUX_PRESETS, Flux

    torch.manual_seed(0)
    flux = Flux(FLUX_PRESETS["tiny"]).eval()
    b, L = 2, 10
    mask = torch.zeros(b, L, dtype=torch.long)
    mask[0, :3], mask[1, :7] = 1, 1
    txt = torch.randn(b, L, 64)
    zeroed = txt * mask[..., None]
    args = (torch.randn(b, 8, 64), prepare_img_ids(b, 2, 4))
    rest = (torch.zeros(b, L, 3), torch.tensor([0.3, 0.9]), torch.randn(b, 64), torch.full((b,), 3.5), mask)
    with torch.no_grad():
        assert torch.equal(flux(*args, txt, *rest), flux(*args, zeroed, *rest))


def test_bf16_forward_stays_close_to_fp32():
    model = tiny_chroma(3)
    for p in model.parameters():  # weights of a trained model's scale, so bf16's relative error shows as it is
        p.data.mul_(0.3)
    half = Chroma(P).to(torch.bfloat16)
    half.load_state_dict(model.state_dict())
    b, L = 2, 8
    mask = torch.ones(b, L, dtype=torch.long)
    mask[0, 5:] = 0
    args = [torch.randn(b, 4, 64), prepare_img_ids(b, 2, 2), torch.randn(b, L, P.context_in_dim), torch.zeros(b, L, 3),
            torch.tensor([0.7, 0.2]), None, torch.zeros(b), mask]
    with torch.no_grad():
        exact = model(*args)
        low = half(*[a.to(torch.bfloat16) if a is not None and a.is_floating_point() else a for a in args])
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_diffusers_layout_loads_and_the_key_table_matches_diffusers_converter(tmp_path):
    """A Chroma saved by diffusers (ChromaTransformer2DModel.save_pretrained, the layout of lodestones' diffusers
    repos) loads through the same path as FLUX.1's diffusers folders; our BFL -> diffusers table gives exactly what
    diffusers' own single-file converter gives."""
    from library.formats.diffusers_keys import bfl_to_diffusers
    from library.models.checkpoint import analyze_checkpoint, load_transformer

    model = tiny_chroma()
    twin = diffusers_twin(model)
    twin.save_pretrained(tmp_path / "transformer")
    info = analyze_checkpoint(tmp_path)
    assert (info.layout, info.family, info.params) == ("diffusers", "chroma", P)
    loaded = load_transformer(tmp_path, torch.float32)
    want = model.state_dict()
    assert set(loaded.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    ours = bfl_to_diffusers(model.state_dict(), P.hidden_size)
    theirs = twin.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
