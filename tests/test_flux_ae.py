"""FLUX autoencoder: exact BFL layout, numerics against diffusers, tiling, loading (CPU, fp32, tiny config)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import read_key_fixture
from library.models.autoencoder import AE_PRESETS, AutoEncoder, _tiled, infer_ae_params, load_ae
from library.formats.safetensors_io import ModelFileError

TINY = AE_PRESETS["tiny"]


def fixture_shapes() -> dict[str, tuple[int, ...]]:
    return read_key_fixture("ae_keys.txt")


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(TINY).eval()


def image(h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 2 - 1


def test_real_size_layout_matches_bfl_file():
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS["flux"])
    got = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert got == fixture_shapes()
    assert len(got) == 244
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert infer_ae_params(fixture_shapes()) == AE_PRESETS["flux"]


@torch.no_grad()
def test_matches_diffusers_autoencoderkl(tiny_ae):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(TINY.ch_mult)
    ref = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(TINY.ch * m for m in TINY.ch_mult), layers_per_block=TINY.num_res_blocks,
        latent_channels=TINY.z_channels, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(tiny_ae.state_dict()), ref.config), strict=True)

    x = image(64, 48)
    z = tiny_ae.encode(x)
    z_ref = (ref.encode(x).latent_dist.mean - 0.1159) * 0.3611
    assert z.shape == (1, 16, 8, 6)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)

    y = tiny_ae.decode(z)
    y_ref = ref.decode(z / 0.3611 + 0.1159).sample
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sample_uses_generator(tiny_ae):
    x = image(32, 32)
    mean = tiny_ae.encode(x)
    a = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # a - mean is exactly scale * std * eps, with eps drawn from the generator
    logvar = tiny_ae.encoder(x).chunk(2, dim=1)[1]
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a - mean, TINY.scale_factor * torch.exp(0.5 * logvar) * eps, atol=1e-5, rtol=1e-4)


def test_tile_blending_is_exact_for_local_ops():
    # With a purely local op, overlapping tiles and normalised ramps must reproduce the whole-image result,
    # whatever the size (not divisible by the tile, or smaller than it).
    for h, w in [(136, 200), (40, 56), (64, 64)]:
        x = torch.randn(2, 3, h, w)
        torch.testing.assert_close(_tiled(lambda t: F.avg_pool2d(t, 8), x, 64, 16, 1 / 8), F.avg_pool2d(x, 8))
        z = torch.randn(2, 16, h // 8, w // 8)
        up = lambda t: F.interpolate(t, scale_factor=8.0)  # noqa: E731
        torch.testing.assert_close(_tiled(up, z, 8, 2, 8), up(z))


@torch.no_grad()
def test_tiled_close_to_untiled(tiny_ae):
    # 136x200 px (17x25 latents) is larger than the tiles and not a multiple of them.
    x = image(136, 200)
    z = tiny_ae.encode(x)
    zt = tiny_ae.encode(x, tiled=True, tile_size=128, tile_overlap=32)
    assert zt.shape == z.shape
    # A random-weight tiny AE is far from local (GroupNorm with one channel per group acts as instance norm, the
    # mid attention is global, the receptive field exceeds the tiles), so tiles cannot match closely: measured
    # mean |error| is 0.14x the mean |latent| for encode and 0.23x the mean |pixel| for decode.
    # The blending itself is exact (test above).
    assert (z - zt).abs().mean() < 0.2 * z.abs().mean()
    y = tiny_ae.decode(z)
    yt = tiny_ae.decode(z, tiled=True, tile_size=16, tile_overlap=8)
    assert yt.shape == y.shape == x.shape
    assert (y - yt).abs().mean() < 0.3 * y.abs().mean()
    # An image no larger than the tile is one tile: identical to untiled.
    small = image(64, 40)
    assert torch.equal(tiny_ae.encode(small, tiled=True, tile_size=128), tiny_ae.encode(small))
    zs = tiny_ae.encode(small)
    assert torch.equal(tiny_ae.decode(zs, tiled=True, tile_size=16), tiny_ae.decode(zs))


# ----------------------------------------------------------------------------------------------------------------
# load_ae


def tiny_state(tiny_ae) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_ae.state_dict().items()}


def test_load_round_trip(tiny_ae, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(tiny_state(tiny_ae), str(path))
    ae = load_ae(path)
    assert ae.params == TINY and not ae.training
    assert ae.dtype == torch.float32 and ae.device == torch.device("cpu")
    loaded = ae.state_dict()
    assert loaded.keys() == tiny_ae.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_ae.state_dict().items())


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_load_prefixed_and_bf16(tiny_ae, tmp_path, prefix):
    path = tmp_path / "merged.safetensors"
    save_file({prefix + k: v for k, v in tiny_state(tiny_ae).items()}, str(path), metadata={"format": "pt"})
    ae = load_ae(path)
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in tiny_ae.state_dict().items())
    ae16 = load_ae(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ae16.parameters())
    assert ae16.dtype == torch.bfloat16


def test_load_header_length_low_byte_0x80(tiny_ae, tmp_path):
    # Valid files hit this about 1 time in 32 (headers are padded to 8 bytes); this prefixed tiny AE does.
    path = tmp_path / "merged.safetensors"
    save_file({"first_stage_model." + k: v for k, v in tiny_state(tiny_ae).items()}, str(path))
    assert path.read_bytes()[:1] == b"\x80"
    assert load_ae(path).params == tiny_ae.params


def test_load_refuses_transformer_file(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(path))
    with pytest.raises(ModelFileError, match="autoencoder") as err:
        load_ae(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("drop", ["decoder.up.1.block.0.conv1.bias", "encoder.conv_in.weight"])
def test_load_missing_tensor(tiny_ae, tmp_path, drop):
    path = tmp_path / "ae.safetensors"
    state = tiny_state(tiny_ae)
    del state[drop]
    save_file(state, str(path))
    with pytest.raises(ModelFileError) as err:
        load_ae(path)
    assert str(path) in str(err.value) and drop in str(err.value)
