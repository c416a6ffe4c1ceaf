"""The example files under configs/ stay valid: every key known, values of the right type."""

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from library.training.recipes.command_lines import LORA
from library.training.config_file import read_config_from_file
from library.data.config import load_dataset_config
from library.flow.prompts import load_prompts
from library.training.arguments import training_parser, verify_training_args

CONFIGS = ROOT / "configs"


def test_training_config_file_parses_and_verifies(tmp_path):
    parser = training_parser(LORA)
    config = tmp_path / "lora_flux_dev.toml"
    shutil.copy(CONFIGS / "lora_flux_dev.toml", config)
    argv = ["--config_file", str(config)]
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    assert args.network_dim == 16 and args.network_alpha == 16.0 and args.fp8_base and args.learning_rate == 1e-4
    verify_training_args(args, LORA)


def test_dataset_config_resolves(tmp_path, monkeypatch):
    for folder in ("train/sks_dog", "reg/dog"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "a.png")
    monkeypatch.chdir(tmp_path)  # paths in the example are relative to the launch folder
    parser = training_parser(LORA)
    args = parser.parse_args(["--dataset_config", str(CONFIGS / "dataset_lora.toml")])
    group = load_dataset_config(args)
    (ds,) = group.datasets
    assert ds.batch_size == 2 and ds.resolution == (1024, 1024) and ds.max_bucket_reso == 1536
    assert [s.is_reg for s in ds.subsets] == [False, True] and ds.subsets[0].keep_tokens == 1


def test_sample_prompts_parse():
    prompts = load_prompts(CONFIGS / "sample_prompts.txt")
    assert len(prompts) == 2 and prompts[1].image_size() == (832, 1216) and prompts[0].seed == 1


CARD_CONFIGS = {24: "lora_flux_dev.toml", 16: "lora_flux_dev_16gb.toml", 12: "lora_flux_dev_12gb.toml",
                8: "lora_flux_dev_8gb.toml", 6: "lora_flux_dev_6gb.toml", 4: "lora_flux_dev_4gb.toml"}
# cards of 8 GB and more keep a GiB of headroom; the 6 and 4 GB configs fit the card itself (10^9 bytes, as card
# makers count): there is no memory to spare on them
SMALL_CARDS = (6, 4)


def _card_config(card, tmp_path):
    import re

    parser = training_parser(LORA)
    config = tmp_path / CARD_CONFIGS[card]
    shutil.copy(CONFIGS / CARD_CONFIGS[card], config)
    argv = ["--config_file", str(config)]
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    text = (CONFIGS / CARD_CONFIGS[card]).read_text()
    peak = re.search(r"Predicted peak: ([\d.]+) (GiB|GB \(10\^9 bytes)", text)
    assert peak, f"{CARD_CONFIGS[card]} states no predicted peak"
    return args, float(peak.group(1)) * (1e9 / 2**30 if peak.group(2).startswith("GB") else 1.0)



@pytest.mark.parametrize("card", sorted(CARD_CONFIGS))
def test_card_configs_parse_and_state_their_peak(card, tmp_path):
    args, peak = _card_config(card, tmp_path)
    verify_training_args(args, LORA)
    assert args.fp8_base and args.gradient_checkpointing and args.network_dim == 16
    assert 0 <= (args.blocks_to_swap or 0) <= 35
    if card in SMALL_CARDS:
        assert peak <= card * 1e9 / 2**30 and args.cpu_offload_checkpointing
    else:
        assert peak <= card - 1  # a GiB of headroom for the desktop and other processes


@pytest.mark.slow
@pytest.mark.parametrize("card", [8, 4])
def test_config_prediction_matches_its_comment(tmp_path, monkeypatch, card):
    """The planner's prediction for the 8 and 4 GB configs (1024x1024, batch 1) is the one their comments state."""
    from library.planner.plan import GIB, plan_memory, settings_from_args

    monkeypatch.chdir(ROOT)
    args, peak = _card_config(card, tmp_path)
    args.pretrained_model_name_or_path = None  # plan from the dev preset, as a user before downloading
    plan = plan_memory(settings_from_args(args, "network"))
    assert plan.peak_bytes / GIB == pytest.approx(peak, abs=0.01)
    if card == 4:
        assert plan.peak_bytes <= 4.0e9 and plan.parts["activations"] < 0.05e9  # block inputs wait on the host
