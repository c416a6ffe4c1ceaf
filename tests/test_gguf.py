"""GGUF transformer files: our torch dequantizers against the gguf package's numpy ones, the quantized transformer
against one holding the reference's dequantized weights, inference and LoRA training on a .gguf base."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

import cli_runs  # noqa: E402
import flux_minimal_inference  # noqa: E402
from library.formats.safetensors_io import save_file_atomic  # noqa: E402
from library.formats.gguf_io import GGUFFileError, GGUFTensorReader, read_gguf_header, write_gguf  # noqa: E402
from library.formats import gguf_quants  # noqa: E402
from library.formats.gguf_quants import GGUF_BYTES_PER_PARAM, GGUF_TYPES, dequantize, random_blocks  # noqa: E402
from library.memory.gguf_linear import GGUFLinear, gguf_linears, load_gguf_transformer  # noqa: E402
from library.models.checkpoint import analyze_checkpoint  # noqa: E402
from model_helpers import flux_inputs, run  # noqa: E402
from tools.make_demo_dataset import make_demo_dataset  # noqa: E402
from tools.gguf_kquants import quantize_k  # noqa: E402
from tools.make_tiny_models import gguf_tensors, make_tiny_models, write_flux_gguf  # noqa: E402
from networks import lora_flux  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")  # gguf.quants.quantize has these
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


def random_raw(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid raw bytes of a (rows, cols) tensor: random packed values, finite random scales (float16)."""
    rng = np.random.default_rng(seed)
    t = GGUF_TYPES[qtype]
    if not t.quantized:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype]).view(np.uint8)
    blocks = random_blocks(qtype, rows * cols // t.block_size, seed).numpy()
    return blocks.reshape(rows, -1)


def assert_bit_exact(qtype: str, raw: np.ndarray, cols: int) -> None:
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw), qtype, (raw.shape[0], cols)).numpy()
    assert ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{qtype}: values differ from gguf's"


@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_dequantizer_matches_gguf_numpy_bit_for_bit(qtype, monkeypatch):
    assert_bit_exact(qtype, random_raw(qtype, 6, 512), 512)
    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 3 * 256)  # several chunks, the last one shorter
    assert_bit_exact(qtype, random_raw(qtype, 5, 512, seed=2), 512)
    monkeypatch.undo()
    if qtype in QUANTIZABLE:  # also blocks the reference quantizer made from real values
        values = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32) * 0.05
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
        assert_bit_exact(qtype, np.ascontiguousarray(raw).view(np.uint8), 512)


def test_bytes_per_param_table_matches_gguf():
    for name, bpp in GGUF_BYTES_PER_PARAM.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert bpp == size / block
    assert GGUF_BYTES_PER_PARAM["Q8_0"] == 34 / 32 and GGUF_BYTES_PER_PARAM["Q4_K"] == 144 / 256


def reference_flux(tiny_safetensors, gguf_path, prefix: str = ""):
    """Our float32 Flux with every tensor the .gguf file holds dequantized by the gguf package itself."""
    from library import flux_utils

    _, flux = flux_utils.load_flow_model(tiny_safetensors, torch.float32, "cpu")
    reader = gguf.GGUFReader(gguf_path)
    state = {t.name[len(prefix):]: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
             .reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    flux.load_state_dict(state, strict=True)
    return flux.eval()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Tiny models 256 wide (whole K-quant blocks per row), with a Q8_0 .gguf of the transformer."""
    return make_tiny_models(tmp_path_factory.mktemp("gguf"), hidden_size=256, gguf_type="Q8_0")


@pytest.mark.parametrize("qtype, prefix", [("Q8_0", ""), ("Q4_K", ""), ("Q5_0", "model.diffusion_model."),
                                           ("F16", "")])
def test_quantized_transformer_equals_flux_with_reference_dequantized_weights(wide, tmp_path, qtype, prefix):
    path = wide["flux_gguf"]
    if qtype != "Q8_0" or prefix:
        state = {prefix + k: v for k, v in load_file(str(wide["flux"])).items()}
        path = write_flux_gguf(state, tmp_path / "k.gguf", qtype, "flux-1-dev")
    info = analyze_checkpoint(path)
    assert info.layout == "gguf" and info.dtypes == {"F32", qtype} and info.params.hidden_size == 256
    assert info.prefix == prefix
    flux = load_gguf_transformer(path, torch.float32)
    linears = gguf_linears(flux)
    blocks = [*flux.double_blocks, *flux.single_blocks]
    block_linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    # every block Linear stays quantized; a float file (F16) loads as plain Linears in the compute dtype
    assert linears == (block_linears if GGUF_TYPES[qtype].quantized else [])
    assert all(m.qtype == qtype for m in linears)
    assert flux.dtype == torch.float32 and not isinstance(flux.img_in, GGUFLinear)
    ref = reference_flux(wide["flux"], path, prefix)
    inputs = flux_inputs(flux)
    assert torch.equal(run(flux, inputs), run(ref, inputs))
    # backward through the frozen quantized weights: the same input gradient as through the float weights
    grads = []
    for model in (flux, ref):
        img = inputs["img"].clone().requires_grad_(True)
        model(**{**inputs, "img": img}).square().sum().backward()
        grads.append(img.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("qtype, bound", [("Q6_K", 0.03), ("Q5_K", 0.05), ("Q4_K", 0.1), ("Q3_K", 0.25),
                                          ("Q2_K", 0.4)])
def test_k_quant_encoder_of_the_tool_approximates_its_values(qtype, bound):
    values = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    raw = quantize_k(values, qtype)
    assert raw.shape == (16, 2 * GGUF_TYPES[qtype].type_size)
    back = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]))  # the reference
    assert (back - values).norm() / values.norm() < bound


def test_wrong_gguf_files_are_refused_with_one_line(tmp_path, wide, monkeypatch):
    from library.models.checkpoint import ModelFileError

    llm = tmp_path / "llm.gguf"
    write_gguf(llm, {"blk.0.attn_q.weight": (torch.randn(32, 32), "Q8_0")}, arch="llama")
    with pytest.raises(ModelFileError, match=r"llm.gguf: GGUF file of architecture 'llama'.*FLUX transformer"):
        analyze_checkpoint(llm)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(wide["flux_gguf"].read_bytes()[:-4096])
    with pytest.raises(GGUFFileError, match="cut.gguf"):
        with GGUFTensorReader(read_gguf_header(truncated)) as r:
            for name in r.header.tensors:
                r.raw(name)
    from library.models.text_encoders import load_t5xxl

    with pytest.raises(ModelFileError, match=r"flux-Q8_0.gguf: is a GGUF file; only the FLUX transformer"):
        load_t5xxl(wide["flux_gguf"], torch.float32, "cpu")  # a GGUF T5, say
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GGUFFileError, match="pip install gguf"):
        read_gguf_header(wide["flux_gguf"])


def test_real_size_double_block_dequantizes_bit_exactly():
    """Every Linear of one FLUX.1 double block at its real width (3072), each in two types (~6 s on one core)."""
    shapes = {"img_mod.lin": (18432, 3072), "img_attn.qkv": (9216, 3072), "img_attn.proj": (3072, 3072),
              "img_mlp.0": (12288, 3072), "img_mlp.2": (3072, 12288)}
    types = ["Q8_0", "Q6_K", "Q4_K", "Q5_K", "Q3_K", "Q2_K", "Q4_0", "Q5_1"]
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        for qtype in (types[i], types[-1 - i]):
            assert_bit_exact(qtype, random_raw(qtype, rows, cols, seed=i), cols)


def render(models, ckpt, out, *extra):
    args = ["--ckpt_path", str(ckpt), "--ae", str(models["ae"]), "--clip_l", str(models["clip_l"]), "--t5xxl",
            str(models["t5xxl"]), "--tokenizer_cache_dir", str(models["tokenizers"]), "--dtype", "fp32", "--width",
            "32", "--height", "32", "--steps", "2", "--seed", "4", "--output_dir", str(out), *extra]
    code = flux_minimal_inference.main(args)
    pngs = sorted(out.glob("*.png"))
    return code, (np.asarray(Image.open(pngs[0])).astype(int) if pngs else None)


def test_inference_from_gguf_with_lora_equals_the_dequantized_weights(wide, tmp_path, capsys):
    gguf_path = wide["flux_gguf"]
    ref = reference_flux(wide["flux"], gguf_path)
    dequantized = tmp_path / "dequantized.safetensors"
    save_file_atomic(ref.state_dict(), dequantized)
    network = lora_flux.create_network(1.0, 4, 4.0, None, None, ref)
    network.apply_to(None, ref)
    torch.manual_seed(5)
    for name, p in network.named_parameters():
        p.data.normal_(0, 0.2)
    lora = tmp_path / "lora.safetensors"
    network.save_weights(lora, None, None)

    images = {}
    for name, ckpt, extra in (("gguf", gguf_path, ()), ("float", dequantized, ()),
                              ("gguf_lora", gguf_path, ("--lora_weights", str(lora))),
                              ("float_lora", dequantized, ("--lora_weights", str(lora)))):
        code, images[name] = render(wide, ckpt, tmp_path / name, *extra)
        assert code == 0
    # same values through GGUFLinear as through float Linears (a BLAS result may differ by an ulp: one level)
    assert np.abs(images["gguf"] - images["float"]).max() <= 1
    assert np.abs(images["gguf_lora"] - images["float_lora"]).max() <= 1
    assert np.abs(images["gguf_lora"] - images["gguf"]).max() > 10  # the LoRA was applied
    capsys.readouterr()
    code, _ = render(wide, gguf_path, tmp_path / "merged", "--lora_weights", str(lora), "--merge_lora_weights")
    err = capsys.readouterr().err
    assert code == 2 and "cannot be merged into a GGUF" in err and str(lora) in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """Tiny models whose transformer (4 double, 8 single blocks, so blocks can be swapped) is a Q8_0 .gguf, and the
    same values dequantized by the gguf package in a float32 .safetensors."""
    from dataclasses import replace

    from library.models.transformer import Flux

    base = tmp_path_factory.mktemp("gguf_train")
    models = make_tiny_models(base / "models")
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    blocks12 = base / "models" / "flux12.safetensors"
    save_file_atomic(Flux(params).state_dict(), blocks12)
    models["flux"] = write_flux_gguf(load_file(str(blocks12)), base / "models" / "flux12-Q8_0.gguf", "Q8_0",
                                     "flux-1-dev")
    dequantized = base / "models" / "flux12-dequantized.safetensors"
    save_file_atomic(reference_flux(blocks12, models["flux"]).state_dict(), dequantized)
    return models, make_demo_dataset(base / "data", count=2, size=32), dequantized


def train(train_setup, out, *extra, ckpt=None):
    models, toml, _ = train_setup
    models = {**models, "flux": ckpt or models["flux"]}
    argv = [*cli_runs.run_args(models, toml, out), "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--learning_rate", "1e-2", "--max_train_steps", "3", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--gradient_checkpointing", *extra]
    trainer, code = cli_runs.run_trainer("network", argv)
    assert code == 0
    return trainer, load_file(str(out / "last.safetensors"))


def test_lora_training_on_a_gguf_base_equals_the_dequantized_base_and_swaps(train_setup, tmp_path):
    trainer, got = train(train_setup, tmp_path / "gguf")
    assert len(gguf_linears(trainer.models.flux)) == 4 * 10 + 8 * 3
    ups = [v for k, v in got.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups)  # trained (lora_up starts at zero)
    _, float_base = train(train_setup, tmp_path / "float", ckpt=train_setup[2])
    assert got.keys() == float_base.keys() and all(torch.equal(got[k], float_base[k]) for k in got)
    trainer, swapped = train(train_setup, tmp_path / "swap", "--blocks_to_swap", "3")
    assert torch.uint8 in trainer.block_swappers[0].layout.dtypes  # the quantized bytes are what moves
    assert all(torch.equal(got[k], swapped[k]) for k in got), "block swapping changed the LoRA"


@pytest.mark.parametrize("kind, extra, message", [
    ("network", ("--network_module", "networks.lora_flux", "--fp8_base", "--mixed_precision", "bf16"),
     "--fp8_base does not apply"),
    ("full", ("--full_bf16", "--mixed_precision", "bf16"), "LoRA training base only"),  # ControlNet: same flag
])
def test_gguf_base_refusals(train_setup, tmp_path, kind, extra, message):
    from library.training.errors import TrainingError

    models, toml, _ = train_setup
    argv = [*cli_runs.run_args(models, toml, tmp_path), "--max_train_steps", "1", *extra]
    with pytest.raises(TrainingError, match=f"flux12-Q8_0.gguf is a GGUF .*{message}"):
        cli_runs.run_trainer(kind, argv)


def test_block_swap_refuses_blocks_stored_in_different_types(train_setup, tmp_path, capsys):
    models, _, dequantized = train_setup
    tensors = gguf_tensors(load_file(str(dequantized)), "Q8_0")
    tensors["double_blocks.3.img_attn.qkv.weight"] = (tensors["double_blocks.3.img_attn.qkv.weight"][0], "Q4_0")
    mixed = tmp_path / "mixed.gguf"
    write_gguf(mixed, tensors, arch="flux")
    code, _ = render(models, mixed, tmp_path / "out", "--blocks_to_swap", "3")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert ("mixed.gguf: --blocks_to_swap needs the blocks of each stack stored alike, but "
            "double_blocks.0.img_attn.qkv.weight is Q8_0 and double_blocks.3.img_attn.qkv.weight is Q4_0") in err
    assert render(models, mixed, tmp_path / "unswapped")[0] == 0  # without swapping it renders
    # a file stored alike swaps, and renders what it renders without swapping
    plain, swapped = (render(models, models["flux"], tmp_path / name, *extra)
                      for name, extra in (("plain", ()), ("swapped", ("--blocks_to_swap", "3"))))
    assert plain[0] == swapped[0] == 0 and np.array_equal(plain[1], swapped[1])


def test_streamed_entries_dequantize_and_the_merge_tool_refuses_gguf(wide, tmp_path, capsys):
    from library.models.checkpoint_stream import Readers, transformer_entries
    from networks import flux_merge_lora

    ref = reference_flux(wide["flux"], wide["flux_gguf"]).state_dict()
    readers = Readers()
    try:
        entries, info = transformer_entries(wide["flux_gguf"], readers)
        assert info.layout == "gguf" and {e.key for e in entries} == set(ref)
        assert all(torch.equal(e.read(), ref[e.key]) for e in entries)  # what LoRA extraction reads
    finally:
        readers.close()
    lora = tmp_path / "lora.safetensors"
    save_file_atomic({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 256),
                      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(768, 4),
                      "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, lora)
    code = flux_merge_lora.main(["--flux_model", str(wide["flux_gguf"]), "--save_to", str(tmp_path / "m.safetensors"),
                                 "--models", str(lora)])
    err = capsys.readouterr().err
    assert code == 2 and "is a GGUF (quantized) transformer; a LoRA cannot be merged into it" in err
    assert err.count("\n") == 1 and not (tmp_path / "m.safetensors").exists()
