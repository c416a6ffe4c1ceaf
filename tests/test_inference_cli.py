"""flux_minimal_inference.py end to end on tiny models written by tools/make_tiny_models.py."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.models.variants import VARIANTS
from conftest import ROOT
from test_atomic_io import dead_pid
from library.formats.diffusers_keys import bfl_to_diffusers
from library.formats.safetensors_io import save_file_atomic
from tools.make_tiny_models import make_tiny_models

import flux_minimal_inference as cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


def base_args(tiny, out, *extra):
    return ["--ckpt_path", str(tiny["flux"]), "--ae", str(tiny["ae"]), "--clip_l", str(tiny["clip_l"]),
            "--t5xxl", str(tiny["t5xxl"]), "--tokenizer_cache_dir", str(tiny["tokenizers"]), "--dtype", "fp32",
            "--width", "64", "--height", "48", "--steps", "3", "--output_dir", str(out), *extra]


def run_cli(args):
    return subprocess.run([sys.executable, str(ROOT / "flux_minimal_inference.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def only_png(folder: Path) -> Path:
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    return files[0]


def test_cli_writes_png_reproducibly_with_parameters(tiny, tmp_path):
    r = run_cli(base_args(tiny, tmp_path / "a", "--seed", "7", "--prompt", "a red cube"))
    assert r.returncode == 0, r.stderr
    png = only_png(tmp_path / "a")
    image = Image.open(png)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert image.text["prompt"] == "a red cube" and image.text["seed"] == "7"
    assert "Steps: 3, Seed: 7, Size: 64x48" in image.text["parameters"]

    # same seed and settings -> identical bytes; in-process main() as well as the subprocess
    assert cli.main(base_args(tiny, tmp_path / "b", "--seed", "7", "--prompt", "a red cube")) == 0
    assert only_png(tmp_path / "b").read_bytes() == png.read_bytes()
    assert cli.main(base_args(tiny, tmp_path / "c", "--seed", "8", "--prompt", "a red cube")) == 0
    assert only_png(tmp_path / "c").read_bytes() != png.read_bytes()


def test_size_not_multiple_of_16_rounds_up_with_message(tiny, tmp_path, caplog):
    args = base_args(tiny, tmp_path, "--seed", "1")
    args[args.index("--width") + 1] = "70"
    args[args.index("--height") + 1] = "50"
    stale = tmp_path / f".old.png.flux-tmp-{dead_pid()}-abcdefgh.png"  # a run killed while writing its PNG
    stale.write_bytes(b"half a PNG")
    with caplog.at_level("INFO"):
        assert cli.main(args) == 0
    assert not stale.exists()
    image = Image.open(only_png(tmp_path))
    assert image.size == (80, 64)
    assert "70x50 is not a multiple of 16: the image will be 80x64" in caplog.text
    # the metadata records the size rendered (what re-renders this image), and what was asked for
    assert (image.text["width"], image.text["height"], image.text["requested_size"]) == ("80", "64", "70x50")
    assert "Size: 80x64," in image.text["parameters"]


def test_cfg_with_negative_prompt_changes_the_image(tiny, tmp_path):
    assert cli.main(base_args(tiny, tmp_path / "plain", "--seed", "3")) == 0
    assert cli.main(base_args(tiny, tmp_path / "cfg", "--seed", "3", "--negative_prompt", "blurry",
                              "--cfg_scale", "4")) == 0
    assert cli.main(base_args(tiny, tmp_path / "neg1", "--seed", "3", "--negative_prompt", "blurry")) == 0
    plain = only_png(tmp_path / "plain")
    assert only_png(tmp_path / "cfg").read_bytes() != plain.read_bytes()
    # cfg_scale 1 ignores the negative prompt: same pixels as without it
    assert np.asarray(Image.open(only_png(tmp_path / "neg1"))).tolist() == np.asarray(Image.open(plain)).tolist()


def test_diffusers_and_comfyui_layouts_render_the_same_image(tiny, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(tiny["flux"]))
    comfy = tmp_path / "comfy.safetensors"
    save_file_atomic({"model.diffusion_model." + k: v for k, v in sd.items()}, comfy)
    folder = tmp_path / "diffusers" / "transformer"
    save_file_atomic(bfl_to_diffusers(sd, sd["img_in.weight"].shape[0]), folder / "diffusion_pytorch_model.safetensors")
    outputs = []
    for i, ckpt in enumerate((tiny["flux"], comfy, tmp_path / "diffusers")):
        args = base_args(tiny, tmp_path / f"o{i}", "--seed", "5")
        args[args.index("--ckpt_path") + 1] = str(ckpt)
        assert cli.main(args) == 0
        outputs.append(np.asarray(Image.open(only_png(tmp_path / f"o{i}"))).astype(int))
    # identical weights (see test_checkpoint_loading); BLAS results can depend on buffer alignment by 1 ulp,
    # which may flip a rounded pixel by one level
    assert np.abs(outputs[0] - outputs[1]).max() <= 1 and np.abs(outputs[0] - outputs[2]).max() <= 1


def test_fp8_transformer_and_t5_run(tiny, tmp_path):
    assert cli.main(base_args(tiny, tmp_path, "--seed", "2", "--flux_dtype", "fp8", "--t5xxl_dtype",
                              "fp8_e4m3fn")) == 0
    assert Image.open(only_png(tmp_path)).size == (64, 48)


def test_interactive_mode_reads_prompts_until_empty_line(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "flux_minimal_inference.py"),
                        *base_args(tiny, tmp_path, "--interactive")],
                       input="a dog --w 32 --h 32 --d 4\nsecond --s 2 --d 4\n\nnever rendered\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 2
    assert {Image.open(p).text["prompt"] for p in images} == {"a dog", "second"}
    assert all(Image.open(p).size == (32, 32) for p in images)  # width/height persist between prompts


def test_parse_interactive_line():
    from library.flow.generation import GenerationSettings

    s = cli.parse_interactive_line("a cat --w 512 --h 256 --s 8 --d 9 --g 2.5 --n ugly --c 3",
                                   GenerationSettings(prompt="", seed=1))
    assert (s.prompt, s.width, s.height, s.steps, s.seed, s.guidance, s.negative_prompt, s.cfg_scale) == \
        ("a cat", 512, 256, 8, 9, 2.5, "ugly", 3.0)
    nxt = cli.parse_interactive_line("a dog --n -", s)
    assert (nxt.width, nxt.steps, nxt.seed, nxt.negative_prompt, nxt.cfg_scale) == (512, 8, None, None, 3.0)
    with pytest.raises(ValueError, match="--x"):
        cli.parse_interactive_line("a cat --x 1", s)
    with pytest.raises(ValueError, match="--w must be an integer 1 or more, got 'wide'"):
        cli.parse_interactive_line("a cat --w wide", s)
    with pytest.raises(ValueError, match="--s must be 1 or more, got 0"):  # the command line's checks
        cli.parse_interactive_line("a cat --s 0", s)


@pytest.mark.parametrize("argv, message", [
    (["--width", "-16"], "argument --width: must be 1 or more, got -16"),
    (["--height", "0"], "argument --height: must be 1 or more, got 0"),
    (["--steps", "0"], "argument --steps: must be 1 or more, got 0"),
    (["--seed", "-5"], "argument --seed: must be from 0 to 4294967295, got -5"),
    (["--blocks_to_swap", "-1"], "argument --blocks_to_swap: must be 0 or more, got -1"),
    (["--stpes", "4"], "unknown option --stpes (did you mean --steps?); see --help"),
    (["--widt", "64"], "unknown option --widt (did you mean --width?)"),  # never an abbreviation of --width
])
def test_bad_options_are_one_line_before_anything_loads(tmp_path, capsys, argv, message):
    args = ["--ckpt_path", "missing.safetensors", "--ae", "a", "--clip_l", "c", "--t5xxl", "t",
            "--output_dir", str(tmp_path), *argv]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {message}" in err and "usage:" not in err, err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())
    assert cli.setup_parser().parse_args(args[:10] + ["--guidance", "-1.5"]).guidance == -1.5  # any float


@pytest.mark.parametrize("role", ["--ckpt_path", "--ae", "--clip_l", "--t5xxl"])
def test_wrong_files_get_one_clear_error(tiny, tmp_path, role):
    swapped = {"--ckpt_path": tiny["ae"], "--ae": tiny["flux"], "--clip_l": tiny["t5xxl"], "--t5xxl": tiny["clip_l"]}
    args = base_args(tiny, tmp_path)
    args[args.index(role) + 1] = str(swapped[role])
    r = run_cli(args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(swapped[role]) in r.stderr and "expected" in r.stderr


def test_pickle_lora_and_truncated_files_are_refused(tiny, tmp_path, capsys):
    pickle = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    lora = tmp_path / "lora.safetensors"
    save_file_atomic({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64)}, lora)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(tiny["flux"]).read_bytes()[:100_000])
    for path, words in ((pickle, "pickled"), (lora, "looks like a LoRA"), (truncated, "truncated")):
        args = base_args(tiny, tmp_path)
        args[args.index("--ckpt_path") + 1] = str(path)
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert words in err and str(path) in err and err.count("\n") == 1


def test_help_is_fast():
    for script in ("flux_minimal_inference.py", "tools/make_tiny_models.py"):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "usage" in r.stdout
        assert time.perf_counter() - start < 2.0


def test_schnell_uses_4_unshifted_steps_and_offload_gives_the_same_image(tmp_path, caplog):
    tiny = make_tiny_models(tmp_path / "schnell", preset="tiny-schnell")
    args = base_args(tiny, tmp_path / "a", "--seed", "11")
    del args[args.index("--steps"):args.index("--steps") + 2]
    with caplog.at_level("INFO"):
        assert cli.main(args) == 0
    assert "schnell" in caplog.text and "4 steps" in caplog.text
    args[args.index("--output_dir") + 1] = str(tmp_path / "b")
    assert cli.main(args + ["--offload"]) == 0
    assert only_png(tmp_path / "a").read_bytes() == only_png(tmp_path / "b").read_bytes()


@pytest.mark.parametrize("model_type, preset, steps, guidance", [("schnell", "tiny-schnell", "4", "0.0"),
                                                                  ("krea", "tiny", "50", "4.5")])
def test_model_type_defaults_reach_the_png(tmp_path, model_type, preset, steps, guidance):
    """--model_type schnell / krea without --steps / --guidance: the model's defaults are rendered and recorded
    (schnell has no guidance input: 0 is fed and recorded)."""
    tiny = make_tiny_models(tmp_path / "m", preset=preset)
    args = base_args(tiny, tmp_path / "o", "--seed", "2", "--model_type", model_type, "--width", "32", "--height", "32")
    del args[args.index("--steps"):args.index("--steps") + 2]
    assert cli.main(args) == 0
    image = Image.open(only_png(tmp_path / "o"))
    assert (image.text["steps"], image.text["guidance"]) == (steps, guidance)
    assert f"Steps: {steps}, Seed: 2, Size: 32x32, Guidance: {guidance}" in image.text["parameters"]


def test_python_api_from_readme(tiny):
    from library import flux_utils
    from library.flow.generation import FluxModels, GenerationSettings, Placement, generate

    is_schnell, flux = flux_utils.load_flow_model(tiny["flux"], torch.float32, "cpu")
    ae = flux_utils.load_ae(tiny["ae"], torch.float32, "cpu")
    clip_l = flux_utils.load_clip_l(tiny["clip_l"], torch.float32, "cpu")
    t5xxl = flux_utils.load_t5xxl(tiny["t5xxl"], torch.float32, "cpu")
    tokenizer = flux_utils.load_tokenizer(tokenizer_cache_dir=tiny["tokenizers"], is_schnell=is_schnell)
    assert tokenizer.t5_max_length == 512
    l_pooled, t5_out, txt_ids, t5_mask = flux_utils.encode_prompts(clip_l, t5xxl, *tokenizer(["a cat"]))
    assert t5_out.shape[:2] == (1, 512) and l_pooled.shape == (1, clip_l.config.hidden_size)
    models = FluxModels(flux, ae, clip_l, t5xxl, tokenizer, VARIANTS["schnell" if is_schnell else "dev"], torch.float32)
    image = generate(models, GenerationSettings(prompt="a cat", width=32, height=32, steps=2, seed=1),
                     Placement("cpu", offload=False), progress=False)
    assert image.size == (32, 32)


@pytest.mark.gpu
def test_cuda_bf16_render_is_close_to_cpu_fp32(tiny, tmp_path):
    assert cli.main(base_args(tiny, tmp_path / "cpu", "--seed", "1", "--device", "cpu")) == 0
    args = base_args(tiny, tmp_path / "gpu", "--seed", "1", "--device", "cuda")
    args[args.index("--dtype") + 1] = "bf16"
    assert cli.main(args) == 0
    a = np.asarray(Image.open(only_png(tmp_path / "cpu"))).astype(float)
    b = np.asarray(Image.open(only_png(tmp_path / "gpu"))).astype(float)
    assert np.abs(a - b).mean() < 8  # bf16 vs fp32 on random tiny weights: close, not identical
