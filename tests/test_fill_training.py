"""FLUX.1 Fill training through flux_train_network.py and flux_train.py on tiny models: masks from files (matched by
stem, every missing one listed) or drawn by the seeded generator (the same on resume), the condition features reach
img_in (384 wide), the kept-area loss weight, the refusals, and block swapping / fp8 / the memory planner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cli_runs
from cli_runs import run_args
from library.data.fill_masks import MASK_GENERATORS, generate_mask, mask_seed
from library.training.recipes.fill import loss_weights
from library.training.recipes.fill_options import MASK_GENERATORS as OPTION_GENERATORS
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = ("--network_module", "networks.lora_flux", "--network_dim", "4", "--network_train_unet_only")


def fill_dataset(base: Path, count: int = 3, size: int = 32, masks: bool = True, seed: int = 0) -> Path:
    """Pictures of a coloured square on a dark ground with captions, masks (the square's box, white) in masks/ when
    `masks`; returns the dataset TOML."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[...] = rng.integers(0, 80, 3)
        y, x = (int(v) for v in rng.integers(2, size - 14, 2))
        rgb[y:y + 12, x:x + 12] = [230, 40, 20]
        Image.fromarray(rgb).save(base / "images" / f"img{i}.png")
        (base / "images" / f"img{i}.txt").write_text("a red square")
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + 12, x:x + 12] = 255
        Image.fromarray(mask, mode="L").save(base / "masks" / f"img{i}.png")
    toml = base / ("dataset.toml" if masks else "dataset_nomask.toml")
    mask_line = f'fill_mask_dir = "{base / "masks"}"\n' if masks else ""
    toml.write_text(f'[general]\nresolution = {size}\nbatch_size = 1\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{base / "images"}"\n{mask_line}')
    return toml


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("filltrain")
    return make_tiny_models(base / "models", model_type="fill"), fill_dataset(base / "data")


def img_in_inputs(trainer) -> list[torch.Tensor]:
    seen = []
    trainer.models.flux.img_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen


def test_mask_generator_is_seeded_and_draws_each_kind():
    for kind in MASK_GENERATORS:
        a = generate_mask(kind, 48, 32, mask_seed(7, 3, "a.png"))
        assert a.shape == (32, 48) and a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0}
        assert np.array_equal(a, generate_mask(kind, 48, 32, mask_seed(7, 3, "a.png")))
        assert 0 < a.mean() <= 1
    draws = [generate_mask("mixed", 32, 32, mask_seed(1, s, "x.png")) for s in range(40)]
    assert any(d.mean() == 1 for d in draws) and any(d.mean() < 1 for d in draws)
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])
    assert MASK_GENERATORS == OPTION_GENERATORS


def test_loss_weights_follow_the_mask():
    masks = torch.tensor([[[1.0, 0.0, 0.5]]])
    assert torch.allclose(loss_weights(masks, 0.0, None), masks)
    assert torch.allclose(loss_weights(masks, 0.2, None), torch.tensor([[[1.0, 0.2, 0.6]]]))
    assert torch.allclose(loss_weights(masks, 1.0, torch.full((1, 1, 3), 0.5)), torch.full((1, 1, 3), 0.5))


def test_lora_with_mask_files_feeds_the_condition_and_saves_a_fill_lora(tiny, tmp_path):
    models, toml = tiny
    prompts = tmp_path / "prompts.txt"
    image, mask = toml.parent / "images" / "img0.png", toml.parent / "masks" / "img0.png"
    prompts.write_text(f"a red square --w 64 --h 80 --s 2 --d 1\na red square --w 64 --h 64 --s 2 --d 1 "
                       f"--fi {image} --fm {mask}\n")
    argv = [*run_args(models, toml, tmp_path / "out"), *LORA, "--max_train_steps", "2", "--cache_latents",
            "--output_name", "fill_lora", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"]
    trainer, status = cli_runs.run_trainer("network", argv)
    assert status == 0 and trainer.fill
    samples = sorted((tmp_path / "out" / "sample").glob("*.png"))
    # pure generation, and the --fi picture with its --fm mask, each at its prompt's size
    assert sorted(Image.open(p).size for p in samples) == [(64, 64), (64, 80)]
    with safe_open(str(tmp_path / "out" / "fill_lora.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-fill-dev/lora"
    assert trainer.loss_fn.settings.guidance_scale == 30.0  # the table's training guidance


def test_condition_reaches_img_in_as_bfl_builds_it(tiny, tmp_path):
    """The 384 features entering img_in are [noisy | masked picture's AE mean | mask space-to-depth] of the batch."""
    from library.models.fill import fill_features

    models, toml = tiny
    argv = [*run_args(models, toml, tmp_path / "out"), *LORA, "--max_train_steps", "1"]
    import flux_train_network
    from library.training.recipes.lora import LoRATrainer

    args = flux_train_network.setup_parser().parse_args(argv)
    trainer = LoRATrainer(args)
    trainer.setup()
    batch = trainer.train_group[(1, 0, 0)]
    assert batch.fill_images.shape == (1, 3, 32, 32) and batch.fill_masks.shape == (1, 32, 32)
    # the mask file is the red square's box
    red = (batch.fill_images[0, 0] > 0.7) & (batch.fill_images[0, 1] < -0.5)
    assert torch.equal(red, batch.fill_masks[0] > 0.5)
    seen = img_in_inputs(trainer)
    trainer.loss_fn(batch)
    assert seen[0].shape == (1, 4, 384)
    expected = fill_features(trainer.models.ae, batch.fill_images, batch.fill_masks)
    torch.testing.assert_close(seen[0][..., 64:], expected, atol=1e-5, rtol=1e-5)


def test_generated_masks_and_resume_draw_the_same(tiny, tmp_path):
    models, _ = tiny
    toml = fill_dataset(tmp_path / "data", masks=False)
    import flux_train_network
    from library.training.recipes.lora import LoRATrainer

    def batches(*extra):
        args = flux_train_network.setup_parser().parse_args(
            [*run_args(models, toml, tmp_path / "out"), *LORA, "--max_train_steps", "1", *extra])
        trainer = LoRATrainer(args)
        trainer.setup()
        return [trainer.train_group[(1, i, s)].fill_masks for i, s in ((0, 0), (1, 1), (0, 5))]

    a, b = batches("--fill_masks", "mixed"), batches("--fill_masks", "mixed")
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same seed, step and image: the same mask
    assert not torch.equal(a[0], a[2])  # another step: another mask


def test_refusals(tiny, tmp_path):
    models, toml = tiny
    nomask = fill_dataset(tmp_path / "data", masks=False)
    from library.training.errors import TrainingError

    with pytest.raises(TrainingError, match="needs a mask per image.*fill_mask_dir.*--fill_masks"):
        cli_runs.run_trainer("network", [*run_args(models, nomask, tmp_path / "o1"), *LORA, "--max_train_steps", "1"])
    dev = make_tiny_models(tmp_path / "dev")
    with pytest.raises(TrainingError, match="--fill_masks: for FLUX.1 Fill training"):
        cli_runs.run_trainer("network", [*run_args(dev, nomask, tmp_path / "o2"), *LORA, "--max_train_steps", "1",
                                         "--fill_masks", "strokes"])
    with pytest.raises(TrainingError, match="--controlnet_model_name_or_path with FLUX.1 Fill is not supported"):
        cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "o5"), *LORA, "--max_train_steps", "1",
                                         "--controlnet_model_name_or_path", str(models["flux"])])
    from library.data.config import DatasetConfigError

    with pytest.raises(DatasetConfigError, match="'fill_mask_dir' .* is for FLUX.1 Fill training"):
        cli_runs.run_trainer("network", [*run_args(dev, toml, tmp_path / "o3"), *LORA, "--max_train_steps", "1"])
    # a missing mask and an unreadable one are listed together, each with its file
    import shutil

    data = tmp_path / "broken"
    shutil.copytree(toml.parent, data)
    broken = data / "dataset.toml"
    broken.write_text(toml.read_text().replace(str(toml.parent), str(data)))
    (data / "images" / "extra.png").write_bytes((data / "images" / "img0.png").read_bytes())
    (data / "masks" / "img1.png").write_bytes(b"not a png")
    from library.data.images import BadImageError

    with pytest.raises(BadImageError) as e:
        cli_runs.run_trainer("network", [*run_args(models, broken, tmp_path / "o4"), *LORA, "--max_train_steps", "1"])
    message = str(e.value)
    assert "extra.png" in message and "no mask with the same name" in message and "masks/img1.png" in message


# --- memory: swapping, fp8, the planner; full fine-tuning -----------------------------------------------------------


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    """A Fill transformer of 4 double + 8 single blocks (swappable), and the mask-file dataset."""
    from dataclasses import replace

    from library.formats.safetensors_io import save_file_atomic
    from library.models.checkpoint import analyze_checkpoint
    from library.models.transformer import Flux

    base = tmp_path_factory.mktemp("fill_swap")
    models = make_tiny_models(base / "models", model_type="fill")
    params = replace(analyze_checkpoint(models["flux"]).params, depth=4, depth_single_blocks=8)
    torch.manual_seed(3)
    models["flux"] = base / "models" / "flux_fill_12_blocks.safetensors"
    save_file_atomic(Flux(params).state_dict(), models["flux"], {"tiny": "true"})
    return models, fill_dataset(base / "data", count=2)


def train_swap(setup, out, kind="network", *extra):
    from safetensors.torch import load_file

    models, toml = setup
    network = (*LORA, "--learning_rate", "1e-2") if kind == "network" else ()
    run, code = cli_runs.run_trainer(kind, [*run_args(models, toml, out), *network, "--max_train_steps", "2",
                                            "--cache_latents", "--cache_text_encoder_outputs", "--fill_masks",
                                            "strokes", *extra])
    assert code == 0 and run.fill
    return run, load_file(str(out / "last.safetensors"))


FP8 = ("--fp8_base", "--mixed_precision", "bf16")


@pytest.mark.parametrize("precision, swap", [((), ("--gradient_checkpointing", "--blocks_to_swap", "5")),
                                             (FP8, ("--cpu_offload_checkpointing", "--blocks_to_swap", "4"))],
                         ids=["swap", "fp8-offloaded-checkpointing-swap"])
def test_block_swap_trains_the_same_fill_lora(swappable, tmp_path, precision, swap):
    _, reference = train_swap(swappable, tmp_path / "plain", "network", *precision, "--gradient_checkpointing")
    trainer, got = train_swap(swappable, tmp_path / "swap", "network", *precision, *swap)
    assert trainer.block_swappers and all(s.stats.moves > 0 for s in trainer.block_swappers)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "block swapping changed the Fill LoRA"


def test_full_fine_tuning_of_fill_with_block_swap(swappable, tmp_path):
    """flux_train.py trains the 384-wide transformer (img_in included) the same with write-back swapping."""
    plain, reference = train_swap(swappable, tmp_path / "plain", "full", "--gradient_checkpointing")
    swapped, got = train_swap(swappable, tmp_path / "swap", "full", "--gradient_checkpointing", "--blocks_to_swap", "3")
    assert reference["img_in.weight"].shape[1] == 384
    with safe_open(str(tmp_path / "plain" / "last.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-fill-dev"
    assert swapped.losses == plain.losses
    assert all(torch.equal(got[k], reference[k]) for k in reference), "block swapping changed the trained weights"


def test_planner_builds_the_wide_img_in_and_matches_a_real_step():
    from dataclasses import replace

    from library.models.transformer import FLUX_PRESETS
    from library.planner.plan import PlanSettings, plan_memory
    from library.planner.report import measure_cpu_step

    base = PlanSettings(model="test", params=FLUX_PRESETS["tiny"], width=64, height=64, t5_tokens=32,
                        mixed_precision="no", target="cpu")
    fill = replace(base, params=replace(FLUX_PRESETS["tiny"], in_channels=384))
    plan = plan_memory(fill)
    assert plan.peak_bytes == pytest.approx(measure_cpu_step(fill)["peak_bytes"], rel=0.10)
    assert plan.peak_bytes > plan_memory(base).peak_bytes


# --- the masked-picture latent cache (mask files) -------------------------------------------------------------------


def test_cached_masked_latents_equal_the_live_ones_and_go_stale_with_the_mask(tiny, tmp_path):
    """--cache_latents_to_disk with mask files: the condition comes from `<stem>_WxH_flux_fill.npz` entries equal
    to live encoding; a second run reuses them, an edited mask (same size) is re-encoded, as target latents are."""
    import shutil

    import flux_train_network
    from library.data.fill_cache import FillCache, fill_npz_path
    from library.models.fill import condition_tokens, fill_features
    from library.training.recipes.lora import LoRATrainer

    models, toml = tiny
    data = tmp_path / "data"
    shutil.copytree(toml.parent, data)
    local = data / "dataset.toml"
    local.write_text(toml.read_text().replace(str(toml.parent), str(data)))

    def setup(*extra):
        from library.training.arguments import verify_training_args

        args = flux_train_network.setup_parser().parse_args(
            [*run_args(models, local, tmp_path / "out"), *LORA, "--max_train_steps", "1", *extra])
        verify_training_args(args, flux_train_network.COMMAND_LINE)  # --cache_latents_to_disk implies caching
        trainer = LoRATrainer(args)
        trainer.setup()
        return trainer

    cached = setup("--cache_latents_to_disk", "--flip_aug")
    ds = cached.train_group.datasets[0]
    assert ds.fill_cache is not None
    item = ds.items[0]
    assert fill_npz_path(item.absolute_path, item.image_size).exists()
    live = setup()
    assert live.train_group.datasets[0].fill_cache is None
    for flipped in (False, True):
        latents, mask = ds.fill_cache.get(item, flipped)
        from library.data.fill_masks import bucket_mask, bucket_pixels

        pixels = bucket_pixels(ds, item, flipped)[None]
        expected_mask = torch.from_numpy(bucket_mask(ds, item, flipped))[None]
        assert torch.equal(mask[None], expected_mask)
        torch.testing.assert_close(condition_tokens(latents[None], mask[None]),
                                   fill_features(live.models.ae, pixels, expected_mask), atol=1e-5, rtol=1e-5)
    batch = cached.train_group[(1, 0, 0)]
    assert batch.fill_latents is not None and batch.fill_images is None
    seen = img_in_inputs(cached)
    cached.loss_fn(batch)
    assert seen[0].shape[-1] == 384

    cache = FillCache(True, ds.fill_cache.ae_identity)
    def encode(pixels, masks):
        return torch.zeros(pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8)

    assert cache.cache(ds, encode) == 0  # up to date
    mask_path = item.fill_mask_path
    edited = np.asarray(Image.open(mask_path)).copy()
    edited[0, 0] = 255 - edited[0, 0]
    Image.fromarray(edited).save(mask_path)
    assert cache.cache(ds, encode) == 1  # the edited mask's entry only


def test_resume_with_generated_masks_trains_the_same_lora(tiny, tmp_path):
    """--fill_masks draws from the seed, the step and the image: a run resumed at step 3 ends with the same LoRA."""
    from safetensors.torch import load_file

    models, _ = tiny
    toml = fill_dataset(tmp_path / "data", masks=False)
    common = (*LORA, "--fill_masks", "mixed", "--learning_rate", "1e-2", "--max_train_steps", "6",
              "--output_name", "s", "--save_every_n_steps", "3", "--save_state", "--cache_latents")
    _, code = cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "full"), *common])
    assert code == 0
    _, code = cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "resumed"), *common, "--resume",
                                               str(tmp_path / "full" / "s-step00000003-state")])
    assert code == 0
    a = load_file(str(tmp_path / "full" / "s.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "s.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, code = cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "other"), *common,
                                               "--fill_masks", "rectangles"])  # the last one given counts
    c = load_file(str(tmp_path / "other" / "s.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the masks matter


def test_example_fill_configs_parse_and_resolve(tmp_path, monkeypatch):
    import shutil

    import flux_train_network
    from conftest import ROOT
    from library.data.config import load_dataset_config
    from library.training.arguments import verify_training_args
    from library.training.config_file import read_config_from_file

    for folder in ("train/photos", "train/photos_masks"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "a.png")
    (tmp_path / "configs").mkdir()
    for name in ("lora_flux_fill.toml", "dataset_fill.toml"):
        shutil.copy(ROOT / "configs" / name, tmp_path / "configs" / name)
    monkeypatch.chdir(tmp_path)  # paths in the examples are relative to the launch folder
    parser = flux_train_network.setup_parser()
    argv = ["--config_file", "configs/lora_flux_fill.toml"]
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    assert args.fill_masks == "mixed" and args.fill_kept_loss_weight == 1.0 and args.network_dim == 16
    verify_training_args(args, flux_train_network.COMMAND_LINE)
    (ds,) = load_dataset_config(args, support_fill=True).datasets
    assert ds.subsets[0].fill_mask_dir.name == "photos_masks"


def test_kept_loss_weight_reaches_the_loss(tiny, tmp_path):
    """--fill_kept_loss_weight 0: the loss's per-pixel weights are the batch's masks, so a batch whose mask covers
    nothing generated has zero loss."""
    import flux_train_network
    from library.training.recipes.lora import LoRATrainer

    models, toml = tiny
    args = flux_train_network.setup_parser().parse_args(
        [*run_args(models, toml, tmp_path / "out"), *LORA, "--max_train_steps", "1", "--fill_kept_loss_weight", "0"])
    trainer = LoRATrainer(args)
    trainer.setup()
    batch = trainer.train_group[(1, 0, 0)]
    assert trainer.loss_fn(batch).item() > 0
    assert torch.equal(batch.alpha_masks, batch.fill_masks)
    trainer.args.fill_kept_loss_weight = 0.5
    batch = trainer.train_group[(1, 0, 0)]
    for _ in range(2):  # a batch seen again (validation) is weighed once
        trainer.model_inputs(batch)
    assert torch.allclose(batch.alpha_masks, 0.5 + 0.5 * batch.fill_masks)
    trainer.args.fill_kept_loss_weight = 0.0
    batch = trainer.train_group[(1, 0, 0)]
    batch.fill_masks = torch.zeros_like(batch.fill_masks)
    assert trainer.loss_fn(batch).item() == 0
