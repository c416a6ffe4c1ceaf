"""flux_minimal_inference.py with FLUX.1 Canny / Depth: full models, BFL control LoRAs on dev (hooked and merged),
computed maps, defaults in the PNG, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.formats.safetensors_io import save_file_atomic
from library.models.loading import load_flow_model
from test_canny_depth_inference import tiny_depth_model, write_image
from test_control_lora import fake_control_lora
from test_kontext_inference import cli_args, only_png
from tools.make_tiny_models import make_tiny_models

import flux_minimal_inference as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def canny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("canny_cli"), model_type="canny")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("dev_cli"))


def test_full_canny_model_takes_the_control_pictures_size_and_defaults(canny, tmp_path, caplog):
    picture = write_image(tmp_path / "edges.png", 50, 37)
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(canny, tmp_path / "a", "--control_image", str(picture), "--steps", "2")) == 0
    image = only_png(tmp_path / "a")
    assert image.size == (48, 32)  # the control picture's size floored to 16
    assert image.text["guidance"] == "30.0" and image.text["control_image"] == str(picture)
    assert image.text["control_preprocessor"] == "none"
    assert "model: canny (flux-1-canny-dev)" in caplog.text
    assert cli.main(cli_args(canny, tmp_path / "b", "--control_image", str(picture), "--steps", "2",
                             "--control_preprocessor", "canny", "--width", "32", "--height", "32")) == 0
    b = only_png(tmp_path / "b")
    assert b.size == (32, 32) and b.text["control_preprocessor"] == "canny"
    assert cli.main(cli_args(canny, tmp_path / "c", "--control_image", str(picture), "--steps", "2",
                             "--model_type", "depth")) == 0
    assert only_png(tmp_path / "c").text["guidance"] == "10.0"


def test_depth_preprocessor_with_a_local_model(canny, tmp_path):
    folder = tiny_depth_model(tmp_path / "depth")
    picture = write_image(tmp_path / "photo.png", 32, 32)
    assert cli.main(cli_args(canny, tmp_path / "a", "--control_image", str(picture), "--steps", "1",
                             "--model_type", "depth", "--control_preprocessor", "depth", "--depth_model",
                             str(folder))) == 0
    assert only_png(tmp_path / "a").text["control_preprocessor"] == "depth"


def test_control_lora_on_dev_hooked_and_merged(dev, tmp_path, caplog):
    _, flux = load_flow_model(dev["flux"], torch.float32, "cpu")
    lora = tmp_path / "flux1-depth-dev-lora.safetensors"  # BFL's files carry no metadata: the name says depth
    save_file_atomic(fake_control_lora(flux, rank=2), lora)
    picture = write_image(tmp_path / "map.png", 32, 32)
    with caplog.at_level("INFO"):
        assert cli.main(cli_args(dev, tmp_path / "h", "--control_image", str(picture), "--steps", "2",
                                 "--lora_weights", str(lora))) == 0
    hooked = only_png(tmp_path / "h")
    assert hooked.text["guidance"] == "10.0" and "model: depth" in caplog.text
    assert f"applied control LoRA {lora} x 0.85" in caplog.text
    assert cli.main(cli_args(dev, tmp_path / "m", "--control_image", str(picture), "--steps", "2",
                             "--lora_weights", str(lora), "--merge_lora_weights")) == 0
    merged = np.asarray(only_png(tmp_path / "m")).astype(int)
    assert np.abs(merged - np.asarray(hooked).astype(int)).max() <= 1
    assert cli.main(cli_args(dev, tmp_path / "z", "--control_image", str(picture), "--steps", "2",
                             "--lora_weights", f"{lora};0.3")) == 0
    assert not np.array_equal(np.asarray(only_png(tmp_path / "z")), np.asarray(hooked))


def test_one_line_errors(canny, dev, tmp_path):
    picture = write_image(tmp_path / "map.png", 32, 32)
    with pytest.raises(ValueError, match=r"\(canny\) needs one --control_image"):
        cli.run(cli.setup_parser().parse_args(cli_args(canny, tmp_path)))
    with pytest.raises(ValueError, match="--control_image need --controlnet"):
        cli.run(cli.setup_parser().parse_args(cli_args(dev, tmp_path, "--control_image", str(picture))))
    with pytest.raises(ValueError, match="--control_preprocessor depth needs --depth_model"):
        cli.run(cli.setup_parser().parse_args(cli_args(canny, tmp_path, "--control_image", str(picture),
                                                       "--control_preprocessor", "depth")))
    with pytest.raises(ValueError, match="img_in takes 128 features per token, dev takes 64"):
        cli.run(cli.setup_parser().parse_args(cli_args(canny, tmp_path, "--control_image", str(picture),
                                                       "--model_type", "dev")))


def test_readme_section_command_lines_parse_and_verify():
    import re
    import shlex

    import flux_train_network
    from conftest import ROOT
    from library.training.arguments import verify_training_args
    from tools.make_control_maps import setup_parser as maps_parser

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## FLUX.1 Canny / Depth\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 6
    for argv in commands:
        if argv[:2] == ["python", "flux_minimal_inference.py"]:
            cli.setup_parser().parse_args(argv[2:])
        elif argv[:2] == ["python", "tools/make_control_maps.py"]:
            maps_parser().parse_args(argv[2:])
        else:
            assert argv[:3] == ["accelerate", "launch", "flux_train_network.py"]
            verify_training_args(flux_train_network.setup_parser().parse_args(argv[3:]),
                                 flux_train_network.COMMAND_LINE)
