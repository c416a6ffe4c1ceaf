"""flux_minimal_inference.py with diffusers-layout ControlNets on tiny models: Union modes with one image each,
several ControlNets, scale and start/end, alimama-style inpainting (--image/--mask_image), a Kontext base, the
pairing rules of the options, and the control latents (AE mean, packed; the alimama mask rule)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import flux_minimal_inference as cli
from cli_runs import model_args
from library.cli.controlnet_options import add_controlnet_arguments, control_specs
from library.formats.safetensors_io import save_file_atomic
from library.models.diffusers_controlnet import (DiffusersControlNetShape, diffusers_controlnet_from_transformer,
                                                 diffusers_state_dict, write_diffusers_folder)
from tools.make_tiny_models import make_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library import flux_utils

    base = tmp_path_factory.mktemp("dcn")
    models = make_tiny_models(base / "models")
    _, flux = flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")
    paths = {}
    for name, shape in (("union", DiffusersControlNetShape(1, 1, num_mode=10)),
                        ("plain", DiffusersControlNetShape(2, 0)),
                        ("inpaint", DiffusersControlNetShape(2, 0, condition_channels=68))):
        torch.manual_seed(len(name))
        cn = diffusers_controlnet_from_transformer(flux, shape)
        with torch.no_grad():  # trained-looking: the zero projections and embedder made non-zero
            for t in [*cn.controlnet_blocks.parameters(), *cn.controlnet_single_blocks.parameters(),
                      *cn.controlnet_x_embedder.parameters()]:
                t.normal_(0, 0.2)
        paths[name] = base / f"{name}.safetensors"
        save_file_atomic(diffusers_state_dict(cn), paths[name])
    paths["union_folder"] = write_diffusers_folder(paths["union"], _reload(paths["union"], flux), base / "union")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "picture"):
        paths[name] = base / f"{name}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(paths[name])
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    paths["mask"] = base / "mask.png"
    Image.fromarray(mask).save(paths["mask"])
    return models, paths


def _reload(path, flux):
    from library.models.diffusers_controlnet import load_diffusers_controlnet

    return load_diffusers_controlnet(path, flux.params)


def render(setup, out, *extra) -> torch.Tensor:
    models, _ = setup
    argv = ["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--device", "cpu", "--width", "32", "--height",
            "32", "--steps", "2", "--seed", "1", "--output_latents", "--output_dir", str(out), *extra]
    assert cli.main(argv) == 0
    return load_file(str(next(out.glob("*_latents.safetensors"))))["latents"]


def test_union_modes_several_controlnets_scale_and_range(setup, tmp_path):
    _, p = setup
    plain = render(setup, tmp_path / "plain")
    union = ["--controlnet", str(p["union_folder"]), "--control_image", str(p["a"]), "--control_mode", "canny"]
    one = render(setup, tmp_path / "one", *union)
    assert not torch.allclose(one, plain)
    assert not torch.allclose(render(setup, tmp_path / "mode", *union[:-1], "depth"), one)  # the mode matters
    two = render(setup, tmp_path / "two", *union, "--control_image", str(p["b"]), "--control_mode", "2")
    assert not torch.allclose(two, one)
    assert torch.equal(render(setup, tmp_path / "zero", *union, "--controlnet_scale", "0"), plain)
    # 2 steps: step 0 acts iff 0 >= start and 1/2 <= end; with end 0.4 neither step acts
    assert torch.equal(render(setup, tmp_path / "never", *union, "--controlnet_end", "0.4"), plain)
    assert not torch.allclose(render(setup, tmp_path / "first", *union, "--controlnet_end", "0.5"), plain)
    mixed = render(setup, tmp_path / "mixed", "--controlnet", str(p["union"]), "--control_image", str(p["a"]),
                   "--controlnet", str(p["plain"]), "--control_image", str(p["b"]), "--control_mode", "0",
                   "--control_mode", "none", "--controlnet_scale", "0.5")
    assert not torch.allclose(mixed, one)
    png = Image.open(next((tmp_path / "two").glob("*.png")))
    assert png.text["control_mode"] == "0;2" and png.text["control_image"] == f"{p['a']};{p['b']}"


def test_alimama_style_inpainting_takes_image_and_mask(setup, tmp_path, capsys):
    _, p = setup
    inpaint = ["--controlnet", str(p["inpaint"]), "--image", str(p["picture"])]
    steered = render(setup, tmp_path / "in", *inpaint, "--mask_image", str(p["mask"]))
    assert not torch.allclose(steered, render(setup, tmp_path / "plain"))
    models, _ = setup
    base = ["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--width", "32", "--height", "32",
            "--steps", "1", "--output_dir", str(tmp_path / "x")]
    assert cli.main([*base, *inpaint]) == 2
    assert "needs --mask_image" in capsys.readouterr().err
    assert cli.main([*base, *inpaint, "--mask_image", str(p["mask"]), "--outpaint", "0,0,16,0"]) == 2
    assert "--outpaint needs a FLUX.1 Fill model" in capsys.readouterr().err
    # without --width/--height the output takes --image's size, floored to multiples of 16 (48 x 40 -> 48 x 32)
    wide = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(3).random((40, 48, 3)) * 255).astype(np.uint8)).save(wide)
    unsized = [a for a in base if a not in ("--width", "--height", "32")]
    assert cli.main([*unsized, "--controlnet", str(p["inpaint"]), "--image", str(wide), "--mask_image",
                     str(p["mask"]), "--output_latents", "--output_dir", str(tmp_path / "sized")]) == 0
    assert load_file(str(next((tmp_path / "sized").glob("*_latents.safetensors"))))["latents"].shape == (16, 4, 6)
    # a ControlNet that does not inpaint leaves --image to Fill models, which refuse it here
    assert cli.main([*base, "--controlnet", str(p["plain"]), "--control_image", str(p["a"]), "--image",
                     str(p["picture"])]) == 2
    assert "does not inpaint" in capsys.readouterr().err


def test_kontext_base_with_a_controlnet(tmp_path):
    models = make_tiny_models(tmp_path / "k", model_type="kontext")
    from library import flux_utils

    _, flux = flux_utils.load_flow_model(models["flux"], torch.float32, "cpu")
    cn = diffusers_controlnet_from_transformer(flux, DiffusersControlNetShape(1, 0))
    with torch.no_grad():
        for t in [*cn.controlnet_blocks.parameters(), *cn.controlnet_x_embedder.parameters()]:
            t.normal_(0, 0.2)
    save_file_atomic(diffusers_state_dict(cn), tmp_path / "cn.safetensors")
    picture = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(1).random((48, 32, 3)) * 255).astype(np.uint8)).save(picture)
    common = ["--ckpt_path", *model_args(models)[1:], "--dtype", "fp32", "--width", "32", "--height", "48",
              "--steps", "2", "--seed", "1", "--reference_image", str(picture), "--reference_resize", "none",
              "--output_latents"]
    outs = []
    for name, extra in (("plain", []), ("cn", ["--controlnet", str(tmp_path / "cn.safetensors"),
                                               "--control_image", str(picture)])):
        assert cli.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
        outs.append(load_file(str(next((tmp_path / name).glob("*_latents.safetensors"))))["latents"])
    assert outs[0].shape == outs[1].shape == (16, 6, 4) and not torch.allclose(*outs)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_controlnet_arguments(parser)
    parser.add_argument("--image")
    return parser.parse_args(list(argv))


def test_options_pair_up_or_say_why():
    specs = control_specs(parse("--controlnet", "u", "--control_image", "a", "--control_mode", "canny",
                                "--control_image", "b", "--control_mode", "depth", "--controlnet_scale", "0.4",
                                "--controlnet_end", "0.8", "--controlnet_end", "1"))
    assert [(s.controlnet, s.image, s.mode, s.scale, s.end) for s in specs] == [("u", "a", 0, 0.4, 0.8),
                                                                                ("u", "b", 2, 0.4, 1.0)]
    assert control_specs(parse("--controlnet", "i", "--image", "pic"))[0].image == "pic"
    assert control_specs(parse()) == []
    for argv, message in ((("--control_image", "a"), "--control_image need --controlnet"),
                          (("--controlnet", "x"), "needs --control_image"),
                          (("--controlnet", "x", "--controlnet", "y", "--control_image", "a", "--control_image", "b",
                            "--control_image", "c"), "2 --controlnet for 3 --control_image"),
                          (("--controlnet", "x", "--control_image", "a", "--control_image", "b", "--controlnet_scale",
                            "1", "--controlnet_scale", "2", "--controlnet_scale", "3"), "one per --control_image"),
                          (("--controlnet", "x", "--control_image", "a", "--controlnet_start", "0.6",
                            "--controlnet_end", "0.5"), "must be below --controlnet_end")):
        with pytest.raises(ValueError, match=message):
            control_specs(parse(*argv))
    with pytest.raises(SystemExit):
        parse("--control_mode", "sketch")


def test_control_latents_are_the_packed_ae_mean_and_the_alimama_mask():
    from library.data.tensors import prepare_control_image
    from library.flow.control import latent_condition
    from library.flow.generation import Placement
    from library.models.autoencoder import AE_PRESETS, AutoEncoder
    from library.models.packing import pack_latents

    torch.manual_seed(0)
    ae = AutoEncoder(AE_PRESETS["tiny"]).eval()
    picture = (np.random.default_rng(2).random((40, 24, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 24), np.uint8)
    mask[:20] = 200  # > 0.5: generate the top half
    place = Placement(torch.device("cpu"), False)
    plain = latent_condition(picture, ae, place)(32, 32)
    pixels = prepare_control_image(picture, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain, pack_latents(ae.encode(pixels)), atol=1e-6)
        got = latent_condition(picture, ae, place, mask, 68)(32, 32)
        masked = pixels.clone()
        m = (prepare_control_image(np.repeat(mask[..., None], 3, 2), 32, 32)[:, :1] + 1) / 2 > 0.5
        masked[m.expand_as(masked)] = -1.0
        latents = ae.encode(masked)
    keep = 1 - torch.nn.functional.interpolate(m.float(), size=(4, 4), mode="nearest")
    assert got.shape == (1, 4, 68)
    assert torch.allclose(got, pack_latents(torch.cat((latents, keep), 1)), atol=1e-6)
    assert got[0, :2, 64:].sum() == 0 and got[0, 2:, 64:].min() == 1  # top row of tokens generated, bottom kept


def test_readme_section_command_lines_parse_and_verify():
    import re
    import shlex
    from pathlib import Path

    import flux_train_control_net
    from library.training.arguments import verify_training_args

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## diffusers-format ControlNets\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 5
    for argv in commands[:3]:
        assert argv[:2] == ["python", "flux_minimal_inference.py"]
        args = cli.setup_parser().parse_args(argv[2:])
        assert control_specs(args)
    union = control_specs(cli.setup_parser().parse_args(commands[0][2:]))
    assert [(s.mode, s.scale, s.end) for s in union] == [(0, 0.4, 0.8), (2, 0.4, 0.8)]
    assert commands[3][:3] == ["accelerate", "launch", "flux_train_control_net.py"]
    args = flux_train_control_net.setup_parser().parse_args(commands[3][3:])
    verify_training_args(args, flux_train_control_net.COMMAND_LINE)
    assert args.controlnet_format == "diffusers" and args.controlnet_num_modes == 10 and args.control_mode == 0
    import flux_train_network

    assert commands[4][:3] == ["accelerate", "launch", "flux_train_network.py"]
    args = flux_train_network.setup_parser().parse_args(commands[4][3:])
    verify_training_args(args, flux_train_network.COMMAND_LINE)
    assert args.controlnet_model_name_or_path and args.control_mode == 2 and args.controlnet_scale == 0.5
