"""flux_train_control_net.py end to end on tiny models: files, loss, resume, continuing from weights, inference,
and conditioning images aligned with their targets whatever their sizes."""

import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
from cli_runs import model_args, run_args
import flux_minimal_inference as inference_cli
import flux_train_control_net as cli
from library.training.arguments import verify_training_args
from library.training.recipes.controlnet import ControlNetTrainer
from tools.make_demo_dataset import make_controlnet_demo_dataset, make_demo_dataset
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cn")
    models = make_tiny_models(base / "models")
    toml = make_controlnet_demo_dataset(base / "data", count=2, size=32)
    return models, toml


def train_args(setup, out, *extra):
    return [*run_args(*setup, out), "--learning_rate", "1e-3", "--max_train_steps", "6", *extra]


run_trainer = partial(cli_runs.run_trainer, "controlnet")


def test_cli_writes_an_sd_scripts_controlnet_that_inference_loads(setup, tmp_path):
    models, toml = setup
    control = next((toml.parent / "conditioning").glob("*.png"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a shape --w 32 --h 32 --s 2 --d 5 --cn {control}\na shape --w 32 --h 32 --s 2 --d 5\n")
    assert cli.main(train_args(setup, tmp_path / "out", "--output_name", "cn", "--save_precision", "bf16",
                               "--sample_prompts", str(prompts), "--sample_every_n_steps", "6")) == 0
    path = tmp_path / "out" / "cn.safetensors"
    with_cn, without = (np.asarray(Image.open(p)) for p in sorted((tmp_path / "out" / "sample").glob("*.png")))
    assert with_cn.shape == without.shape and not np.array_equal(with_cn, without)
    weights = load_file(str(path))
    assert weights["controlnet_blocks.0.weight"].dtype == torch.bfloat16
    assert weights["controlnet_blocks.1.weight"].abs().sum() > 0  # trained away from zero
    assert {k.split(".")[0] for k in weights} == {"img_in", "time_in", "vector_in", "guidance_in", "txt_in",
                                                  "double_blocks", "controlnet_blocks", "pos_embed_input",
                                                  "input_hint_block"}
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "flux-1-dev" and md["modelspec.resolution"] == "32x32"

    common = ["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--device", "cpu", "--width", "32",
              "--height", "32", "--steps", "2", "--seed", "1", "--output_latents"]

    def render(name, *extra):
        assert inference_cli.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
        return load_file(str(next((tmp_path / name).glob("*_latents.safetensors"))))["latents"]

    plain = render("plain")
    steered = render("cn", "--controlnet", str(path), "--control_image", str(control))
    off = render("off", "--controlnet", str(path), "--control_image", str(control), "--controlnet_scale", "0")
    assert torch.equal(off, plain) and not torch.allclose(steered, plain)
    png = Image.open(next((tmp_path / "cn").glob("*.png")))
    assert png.text["controlnet"] == str(path) and png.text["controlnet_scale"] == "1.0"
    assert inference_cli.main([*common, "--controlnet", str(path)]) == 2  # no --control_image


def test_loss_decreases_on_a_fixed_seed(setup, tmp_path):
    trainer, code = run_trainer(train_args(setup, tmp_path, "--max_train_steps", "120", "--learning_rate", "2e-3",
                                           "--cache_latents"))
    assert code == 0
    first, last = trainer.losses[:30], trainer.losses[-30:]
    assert sum(last) / len(last) < 0.85 * sum(first) / len(first)


def test_resume_equals_uninterrupted_and_weights_continue(setup, tmp_path):
    common = ("--lr_scheduler", "cosine", "--save_every_n_steps", "3", "--save_state", "--output_name", "r",
              "--gradient_checkpointing")
    _, code = run_trainer(train_args(setup, tmp_path / "full", *common))
    assert code == 0
    state = tmp_path / "full" / "r-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3
    _, code = run_trainer(train_args(setup, tmp_path / "resumed", *common, "--resume", str(state)))
    assert code == 0
    a, b = load_file(str(tmp_path / "full" / "r.safetensors")), load_file(str(tmp_path / "resumed" / "r.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --controlnet_model_name_or_path starts from saved weights (learning rate 0: they come back unchanged)
    start = tmp_path / "full" / "r-step00000003.safetensors"
    _, code = run_trainer(train_args(setup, tmp_path / "cont", "--controlnet_model_name_or_path", str(start),
                                     "--learning_rate", "0", "--max_train_steps", "1", "--output_name", "c",
                                     "--mem_eff_save"))
    assert code == 0
    s, c = load_file(str(start)), load_file(str(tmp_path / "cont" / "c.safetensors"))
    assert all(torch.equal(s[k], c[k]) for k in s)


def test_controlnet_training_refuses_subsets_without_conditioning(setup, tmp_path, capsys):
    models, _ = setup
    toml = make_demo_dataset(tmp_path / "plain", count=1, size=32)
    argv = train_args((models, toml), tmp_path / "out")
    assert cli.main(argv) == 2
    assert "DreamBooth subsets are not supported by ControlNet training" in capsys.readouterr().err


def marker_columns(t: torch.Tensor) -> list[int]:
    """Columns where the (3, H, W) image in [-1, 1] is mostly bright."""
    return (t.mean(0).mean(0) > 0).nonzero().flatten().tolist()


def test_conditioning_images_are_cropped_exactly_like_their_targets(tmp_path):
    """A 96x64 target with a bright band at x = 56..63 is centre-cropped to 64x64; its conditioning images, one at
    half size and one squashed to another size and aspect, must show the band on the same columns (resizing them
    straight to the bucket, as sd-scripts does, would put it at about x = 37..42)."""
    from library.training.setup import build_dataset_groups

    images, cond = tmp_path / "images", tmp_path / "cond"
    images.mkdir()
    cond.mkdir()
    target = np.zeros((64, 96, 3), np.uint8)
    target[:, 56:64] = 255
    Image.fromarray(target).save(images / "a.png")
    Image.fromarray(target).save(images / "b.png")
    (images / "a.txt").write_text("x")
    (images / "b.txt").write_text("x")
    Image.fromarray(target).resize((48, 32), Image.NEAREST).save(cond / "a.png")  # half size, same aspect
    Image.fromarray(target).resize((80, 80), Image.NEAREST).save(cond / "b.png")  # another size and aspect
    toml = tmp_path / "cn.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nenable_bucket = false\n[[datasets.subsets]]\n'
                    f'image_dir = "{images.as_posix()}"\nconditioning_data_dir = "{cond.as_posix()}"\n'
                    'caption_extension = ".txt"\n')
    args = cli.setup_parser().parse_args(["--dataset_config", str(toml), "--pretrained_model_name_or_path", "x"])
    train, _ = build_dataset_groups(args, 0, ControlNetTrainer(args).dataset_kinds())
    batches = [train[i] for i in range(len(train))]
    for batch in batches:
        image, control = batch.images[0], batch.conditioning_images[0]
        assert image.shape == control.shape == (3, 64, 64)
        # 96x64 scaled by 1 covers 64x64; centre crop x in [16, 80): the band sits at 40..47
        assert marker_columns(image) == list(range(40, 48))
        assert marker_columns(control) == marker_columns(image), batch.image_keys


def test_example_configs_parse_and_resolve(tmp_path, monkeypatch):
    import shutil

    from conftest import ROOT
    from library.training.config_file import read_config_from_file
    from library.training.setup import build_dataset_groups

    for folder in ("train/images", "train/canny"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "a.png")
    (tmp_path / "train/images/a.txt").write_text("a caption")
    (tmp_path / "configs").mkdir()
    for name in ("controlnet_flux_dev.toml", "dataset_controlnet.toml"):
        shutil.copy(ROOT / "configs" / name, tmp_path / "configs" / name)
    monkeypatch.chdir(tmp_path)  # paths in the examples are relative to the launch folder
    parser = cli.setup_parser()
    argv = ["--config_file", "configs/controlnet_flux_dev.toml"]
    args = verify_training_args(read_config_from_file(parser.parse_args(argv), parser, argv), cli.COMMAND_LINE)
    assert args.learning_rate == 2e-5 and args.cache_latents and args.dataset_config.endswith("controlnet.toml")
    train, _ = build_dataset_groups(args, 0, ControlNetTrainer(args).dataset_kinds())
    (item,) = train.items
    assert item.conditioning_path.name == "a.png" and item.subset.flip_aug
