"""Transformer checkpoints in every accepted layout load to identical weights; bad files get clear errors."""

import pytest
import torch

from library import flux_utils
from library.models.checkpoint import analyze_checkpoint
from library.formats.diffusers_keys import bfl_to_diffusers
from library.models.transformer import FLUX_PRESETS, Flux
from library.memory.fp8 import Fp8Linear, prepare_fp8
from library.formats.safetensors_io import ModelFileError, read_header, save_file_atomic


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return Flux(FLUX_PRESETS["tiny"]).state_dict()


def assert_same_weights(model, sd):
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_every_layout_loads_identical_weights(tiny_sd, tmp_path):
    diff = bfl_to_diffusers(tiny_sd, 64)
    save_file_atomic(tiny_sd, tmp_path / "bfl.safetensors")
    save_file_atomic({"model.diffusion_model." + k: v for k, v in tiny_sd.items()}, tmp_path / "comfy.safetensors")
    # an all-in-one checkpoint: transformer under the ComfyUI prefix beside AE and text-encoder tensors
    save_file_atomic({**{"model.diffusion_model." + k: v for k, v in tiny_sd.items()},
                      "vae.decoder.conv_in.weight": torch.zeros(2), "text_encoders.clip_l.x": torch.zeros(1)},
                     tmp_path / "all_in_one.safetensors")
    save_file_atomic(diff, tmp_path / "diffusers_single.safetensors")
    root = tmp_path / "pipeline"
    save_file_atomic(diff, root / "transformer" / "diffusion_pytorch_model.safetensors")
    keys = sorted(diff)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for i, part in enumerate(shards, 1):
        save_file_atomic({k: diff[k] for k in part},
                         tmp_path / "sharded" / f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors")
    paths = [tmp_path / "bfl.safetensors", tmp_path / "comfy.safetensors", tmp_path / "all_in_one.safetensors",
             tmp_path / "diffusers_single.safetensors", root, root / "transformer", tmp_path / "sharded",
             tmp_path / "sharded" / "diffusion_pytorch_model-00001-of-00002.safetensors"]
    for path in paths:
        is_schnell, model = flux_utils.load_flow_model(path, None, "cpu")
        assert not is_schnell
        assert model.params.depth == 2 and model.params.depth_single_blocks == 2
        assert_same_weights(model, tiny_sd)


def test_analysis_detects_schnell_sizes_and_dtypes(tmp_path):
    params = FLUX_PRESETS["tiny-schnell"]
    with torch.device("meta"):
        shapes = Flux(params).state_dict()
    save_file_atomic({k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in shapes.items()},
                     tmp_path / "s.safetensors")
    info = analyze_checkpoint(tmp_path / "s.safetensors")
    assert info.is_schnell and info.model_type == "schnell" and info.params == params and info.dtypes == {"BF16"}
    is_diffusers, is_schnell, blocks, files = flux_utils.analyze_checkpoint_state(tmp_path / "s.safetensors")
    assert (is_diffusers, is_schnell, blocks, len(files)) == (False, True, (2, 2), 1)


def test_dev_size_detected_from_header_only(tmp_path):
    # a real-size header needs no data to analyse: write the real key/shape table without the weights' bytes
    import json
    import struct

    with torch.device("meta"):
        sd = Flux(FLUX_PRESETS["dev"]).state_dict()
    header, offset = {}, 0
    for k, v in sd.items():
        n = v.numel() * 2
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path = tmp_path / "flux1-dev.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse file: no disk space used
    info = analyze_checkpoint(path)
    assert info.params == FLUX_PRESETS["dev"] and not info.is_schnell


def test_dtype_cast_and_fp8_as_stored(tiny_sd, tmp_path):
    save_file_atomic(tiny_sd, tmp_path / "f32.safetensors")
    _, bf16 = flux_utils.load_flow_model(tmp_path / "f32.safetensors", torch.bfloat16, "cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    fp8_sd = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tiny_sd.items()}
    save_file_atomic(fp8_sd, tmp_path / "fp8.safetensors")
    assert read_header(tmp_path / "fp8.safetensors").tensors["img_in.weight"].dtype == "F8_E4M3"
    _, model = flux_utils.load_flow_model(tmp_path / "fp8.safetensors", None, "cpu")
    assert model.img_in.weight.dtype == torch.float8_e4m3fn and model.img_in.bias.dtype == torch.float32
    assert torch.equal(model.img_in.weight, fp8_sd["img_in.weight"])


def test_fp8_forward_is_close_to_full_precision(tiny_sd):
    model = Flux(FLUX_PRESETS["tiny"]).eval()
    model.load_state_dict(tiny_sd)
    inputs = dict(img=torch.randn(1, 16, 64), img_ids=torch.zeros(1, 16, 3), txt=torch.randn(1, 4, 64),
                  txt_ids=torch.zeros(1, 4, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, 64),
                  guidance=torch.tensor([3.5]))
    with torch.no_grad():
        ref = model(**inputs)
        prepare_fp8(model, torch.float8_e4m3fn, torch.float32)
        out = model(**inputs)
    assert isinstance(model.img_in, Fp8Linear) and model.img_in.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.1  # e4m3 keeps ~2 significant digits per weight


def test_incomplete_or_mismatched_checkpoints_are_errors(tiny_sd, tmp_path):
    missing = dict(tiny_sd)
    del missing["double_blocks.1.txt_mlp.2.bias"]
    save_file_atomic(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match=r"missing.safetensors.*1 missing tensor.*txt_mlp\.2\.bias"):
        flux_utils.load_flow_model(tmp_path / "missing.safetensors", None, "cpu")
    extra = dict(tiny_sd, **{"double_blocks.0.surprise": torch.zeros(1)})
    save_file_atomic(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ModelFileError, match="unexpected tensor.*surprise"):
        flux_utils.load_flow_model(tmp_path / "extra.safetensors", None, "cpu")
    diff = bfl_to_diffusers(tiny_sd, 64)
    diff["transformer_blocks.0.attn.mystery.weight"] = torch.zeros(1)
    save_file_atomic(diff, tmp_path / "odd_diffusers.safetensors")
    with pytest.raises(ModelFileError, match="cannot map.*mystery"):
        flux_utils.load_flow_model(tmp_path / "odd_diffusers.safetensors", None, "cpu")


def test_folder_and_shard_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelFileError, match="only pickled .bin"):
        analyze_checkpoint(tmp_path / "empty")
    shard = tmp_path / "diffusion_pytorch_model-00001-of-00003.safetensors"
    save_file_atomic({"a": torch.zeros(1)}, shard)
    with pytest.raises(ModelFileError, match="incomplete.*00002-of-00003"):
        analyze_checkpoint(shard)
    with pytest.raises(ModelFileError, match="file not found"):
        analyze_checkpoint(tmp_path / "nope.safetensors")


def test_tensor_reader_round_trips_every_dtype_and_shape(tmp_path):
    from library.formats.safetensors_io import load_tensors

    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2, 2).half(),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn), "i64": torch.arange(6).view(2, 3),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(4.0), "empty": torch.zeros(0, 3),
    }
    save_file_atomic(tensors, tmp_path / "t.safetensors")
    loaded = load_tensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    cast = load_tensors(tmp_path / "t.safetensors", keys=["bf16", "i64"], dtype=torch.float32)
    assert cast["bf16"].dtype == torch.float32 and cast["i64"].dtype == torch.int64  # only floats are cast
