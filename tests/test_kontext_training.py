"""FLUX.1 Kontext training (`--model_type kontext`) through flux_train_network.py and flux_train.py on tiny models:
the reference tokens reach the transformer, the loss ignores what the model puts out at their positions, block
swapping / fp8 / offloaded checkpointing train the same weights, the memory planner counts the longer sequence, and
the saved files say Kontext."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cli_runs
from cli_runs import run_args
from library.data.batch import Batch, TextEncoderOutputs
from library.flow.matching import FlowMatchingSettings
from library.models.kontext import KontextFlux
from library.models.transformer import FLUX_PRESETS, Flux
from library.planner.plan import PlanSettings, plan_memory, settings_from_args
from library.planner.report import measure_cpu_step
from library.training.errors import TrainingError
from library.training.loss import FluxLossComputer
from library.training.recipes.kontext import reference_inputs
from tools.make_tiny_models import make_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = ("--network_module", "networks.lora_flux", "--network_dim", "4", "--network_train_unet_only")


def swap_red_blue(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def kontext_dataset(base: Path, count: int = 3, size: int = 32, t2i: int = 2, seed: int = 0) -> Path:
    """(reference, target) pairs of one edit (red and blue swapped) with the caption "swap red and blue", plus
    `t2i` plain text-to-image images in a subset without references; returns the dataset TOML."""
    rng = np.random.default_rng(seed)
    for folder in ("targets", "refs", "plain"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ref = np.zeros((size, size, 3), np.uint8)
        ref[...] = rng.integers(0, 80, 3)
        y, x = rng.integers(4, size - 12, 2)
        ref[y:y + 10, x:x + 10] = [230, 40, 20] if i % 2 == 0 else [40, 200, 60]
        Image.fromarray(ref).save(base / "refs" / f"pair{i}.png")
        Image.fromarray(swap_red_blue(ref)).save(base / "targets" / f"pair{i}.png")
        (base / "targets" / f"pair{i}.txt").write_text("swap red and blue")
    for i in range(t2i):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(base / "plain" / f"p{i}.png")
        (base / "plain" / f"p{i}.txt").write_text("noise")
    toml = base / "dataset.toml"
    toml.write_text(f'[general]\nresolution = {size}\nbatch_size = 1\ncaption_extension = ".txt"\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{base / "targets"}"\nreference_image_dir = "{base / "refs"}"\n'
                    + (f'[[datasets.subsets]]\nimage_dir = "{base / "plain"}"\n' if t2i else ""))
    return toml


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("kontext")
    return make_tiny_models(base / "models"), kontext_dataset(base / "data")


def image_tokens_seen(trainer) -> list[int]:
    """Image tokens entering the transformer per call (a hook on img_in)."""
    seen = []
    trainer.models.flux.img_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    return seen


def test_lora_with_cached_latents_trains_and_saves_a_kontext_lora(tiny, tmp_path):
    models, toml = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"swap red and blue --w 32 --h 32 --s 2 --d 1 --ri {toml.parent / 'refs' / 'pair0.png'}\n"
                       "noise --w 32 --h 32 --s 2 --d 1\n")
    trainer, code = cli_runs.run_trainer("network", [
        *run_args(models, toml, tmp_path), *LORA, "--model_type", "kontext", "--max_train_steps", "2",
        "--cache_latents_to_disk", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"])
    assert code == 0 and trainer.loss_fn.settings.guidance_scale == 1.0  # the variant's training guidance
    assert sorted(p.name for p in (toml.parent / "refs").glob("*.npz")) == [
        f"pair{i}_0032x0032_flux.npz" for i in range(3)]  # reference latents cached beside the references
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-kontext-dev/lora" and meta["ss_guidance_scale"] == "1.0"
    assert len(list((tmp_path / "sample").glob("*.png"))) == 2

    # each batch with a reference hands the transformer 4 target + 4 reference tokens; plain ones 4
    seen = image_tokens_seen(trainer)
    group = trainer.train_group
    batches = [group[k] for k in trainer.sampler]
    for batch in batches:
        with torch.no_grad():
            trainer.loss_fn(batch)
    with_refs = [b.reference_latents is not None for b in batches]
    assert seen == [8 if r else 4 for r in with_refs] and sum(with_refs) == 3


def test_full_fine_tuning_encodes_references_live(tiny, tmp_path):
    models, toml = tiny
    trainer, code = cli_runs.run_trainer("full", [*run_args(models, toml, tmp_path), "--model_type", "kontext",
                                                  "--max_train_steps", "2", "--guidance_scale", "2.5"])
    assert code == 0 and trainer.loss_fn.settings.guidance_scale == 2.5
    batch = next(trainer.train_group[k] for k in trainer.sampler if trainer.train_group[k].reference_images is not None)
    assert batch.reference_latents is None and batch.reference_images.shape == (1, 1, 3, 32, 32)
    latents = trainer.model_inputs(batch)["reference_tokens"]
    expected = trainer.models.ae.encode(batch.reference_images[:, 0], sample=False)  # the posterior mean
    torch.testing.assert_close(latents, reference_inputs(expected[:, None])["reference_tokens"])
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-kontext-dev"


def test_kontext_is_refused_on_a_file_without_guidance_embedder(tmp_path):
    models = make_tiny_models(tmp_path / "models", preset="tiny-schnell")
    toml = kontext_dataset(tmp_path / "data", count=1, t2i=0)
    with pytest.raises(TrainingError, match="--model_type kontext does not fit .*no guidance embedder"):
        cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "out"), *LORA, "--model_type", "kontext",
                                         "--max_train_steps", "1"])


def test_reference_subsets_need_model_type_kontext(tiny, tmp_path):
    models, toml = tiny
    from library.data.config import DatasetConfigError

    with pytest.raises(DatasetConfigError, match="pass --model_type kontext"):
        cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path), *LORA, "--max_train_steps", "1"])


# --- the loss sees the target tokens only ----------------------------------------------------------------------------


def test_outputs_at_reference_positions_do_not_change_the_loss():
    """A hook on the last single block adds noise to its output at the reference tokens' positions: the loss is
    bit-identical. The same noise at the target tokens' positions changes it."""
    torch.manual_seed(0)
    params = FLUX_PRESETS["tiny"]
    flux = Flux(params).eval()
    b, txt_len, h, w = 2, 8, 8, 8
    target_tokens = (h // 2) * (w // 2)
    text = TextEncoderOutputs(torch.randn(b, params.vec_in_dim), torch.randn(b, txt_len, params.context_in_dim),
                              torch.zeros(b, txt_len, 3), None)
    batch = Batch(captions=[""] * b, loss_weights=torch.ones(b), latents=torch.randn(b, 16, h, w),
                  text_encoder_outputs=text, reference_latents=torch.randn(b, 2, 16, h, w))
    loss_fn = FluxLossComputer(FlowMatchingSettings(guidance_scale=1.0), KontextFlux(flux), torch.device("cpu"),
                               torch.float32, model_inputs=lambda batch: reference_inputs(batch.reference_latents))
    sigmas, noise = torch.tensor([0.3, 0.7]), torch.randn(b, 16, h, w)

    def loss_with(positions: slice | None) -> torch.Tensor:
        def perturb(module, args, out):
            out = out.clone()
            out[:, positions] += 10 * torch.randn_like(out[:, positions])
            return out
        handle = flux.single_blocks[-1].register_forward_hook(perturb) if positions else None
        try:
            with torch.no_grad():
                return loss_fn(batch, sigmas=sigmas, noise=noise)
        finally:
            if handle:
                handle.remove()

    clean = loss_with(None)
    start = txt_len + target_tokens  # the single blocks' sequence is [text; target; references]
    assert torch.equal(loss_with(slice(start, None)), clean)
    assert not torch.allclose(loss_with(slice(txt_len, start)), clean)
    assert not torch.allclose(loss_with(slice(txt_len + 1, txt_len + 2)), clean)  # one target token is enough


# --- memory: swapping, fp8, offloaded checkpointing ------------------------------------------------------------------


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    base = tmp_path_factory.mktemp("kontext_swap")
    models, _ = cli_runs.swappable_tiny_models(base)
    return models, kontext_dataset(base / "kontext", count=2, t2i=1)


def train_swap(setup, out, *extra):
    models, toml = setup
    run, code = cli_runs.run_trainer("network", [
        *run_args(models, toml, out), *LORA, "--model_type", "kontext", "--learning_rate", "1e-2",
        "--max_train_steps", "3", "--cache_latents", "--cache_text_encoder_outputs", *extra])
    assert code == 0
    return run, load_file(str(out / "last.safetensors"))


FP8 = ("--fp8_base", "--mixed_precision", "bf16")


@pytest.mark.parametrize("precision, swap", [((), ("--gradient_checkpointing", "--blocks_to_swap", "5")),
                                             (FP8, ("--cpu_offload_checkpointing", "--blocks_to_swap", "4"))],
                         ids=["swap", "fp8-offloaded-checkpointing-swap"])
def test_block_swap_trains_the_same_kontext_lora(swappable, tmp_path, precision, swap):
    _, reference = train_swap(swappable, tmp_path / "plain", *precision, "--gradient_checkpointing")
    trainer, got = train_swap(swappable, tmp_path / "swap", *precision, *swap)
    assert trainer.block_swappers and all(s.stats.moves > 0 for s in trainer.block_swappers)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "block swapping changed the Kontext LoRA"


def test_block_swap_trains_the_same_kontext_transformer(swappable, tmp_path):
    """Full fine-tuning: write-back swapping (the blocks train) with references appended, against no swapping."""
    models, toml = swappable

    def train(out, *extra):
        trainer, code = cli_runs.run_trainer("full", [*run_args(models, toml, out), "--model_type", "kontext",
                                                      "--max_train_steps", "2", "--gradient_checkpointing", *extra])
        assert code == 0
        return trainer, load_file(str(out / "last.safetensors"))

    plain, reference = train(tmp_path / "plain")
    swapped, got = train(tmp_path / "swap", "--blocks_to_swap", "3")
    assert [s.schedule.num_swapped for s in swapped.block_swappers] == [1, 4]
    assert swapped.losses == plain.losses
    assert all(torch.equal(got[k], reference[k]) for k in reference), "block swapping changed the trained weights"


def test_planner_counts_the_reference_tokens():
    tiny = FLUX_PRESETS["tiny"]
    base = PlanSettings(model="test", params=tiny, width=128, height=128, t5_tokens=64, mixed_precision="no",
                        target="cpu")
    kontext = replace(base, reference_images=1)
    plan = plan_memory(kontext)
    measured = measure_cpu_step(kontext)
    assert plan.peak_bytes == pytest.approx(measured["peak_bytes"], rel=0.10)  # checked against a real CPU step
    assert plan.peak_bytes > plan_memory(base).peak_bytes
    assert plan.parts["batch_inputs"] > plan_memory(base).parts["batch_inputs"]


def test_planner_and_blocks_to_swap_auto_read_model_type_kontext(tmp_path):
    from library.cli.main import run_settings
    from library.formats.safetensors_io import save_file_atomic
    from library.planner.plan import GIB, choose_blocks_to_swap
    from library.training.arguments import training_parser
    from library.training.recipes.command_lines import LORA as LORA_LINE
    from library.training.recipes.lora import LoRATrainer

    params = replace(FLUX_PRESETS["tiny"], depth=4, depth_single_blocks=4)
    path = tmp_path / "flux.safetensors"
    save_file_atomic({k: v.to(torch.bfloat16) for k, v in Flux(params).state_dict().items()}, path)
    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\nresolution = 128\n[[datasets]]\nbatch_size = 1\n  [[datasets.subsets]]\n'
                    '  image_dir = "missing"\n')
    argv = ["--pretrained_model_name_or_path", str(path), "--dataset_config", str(toml), "--mixed_precision", "bf16",
            "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents", "--network_dim", "4",
            "--optimizer_type", "AdamW", "--t5xxl_max_token_length", "64", "--blocks_to_swap", "auto"]
    plain = training_parser(LORA_LINE).parse_args(argv)
    kontext = training_parser(LORA_LINE).parse_args([*argv, "--model_type", "kontext"])
    assert settings_from_args(plain).reference_images == 0 and settings_from_args(kontext).reference_images == 1
    peaks = {n: plan_memory(replace(settings_from_args(kontext), blocks_to_swap=n)).peak_bytes for n in (0, 1)}
    kontext.vram_budget_gb = plain.vram_budget_gb = (peaks[0] + peaks[1]) / 2 / GIB
    assert choose_blocks_to_swap(kontext) == 1
    assert choose_blocks_to_swap(plain) == 0  # the same budget fits without the reference tokens
    assert run_settings(kontext, LORA_LINE, LoRATrainer.memory_profile).blocks_to_swap == 1


def test_controlnet_training_refuses_kontext():
    import flux_train_control_net as cli
    from library.training.arguments import TrainingArgumentError, verify_training_args

    args = cli.setup_parser().parse_args(["--model_type", "kontext", "--pretrained_model_name_or_path", "x"])
    with pytest.raises(TrainingArgumentError, match="--model_type kontext is not supported by flux_train_control"):
        verify_training_args(args, cli.COMMAND_LINE)


def test_sample_prompts_take_reference_images(tiny, tmp_path):
    from library.data.images import BadImageError
    from library.flow.prompts import load_prompts

    txt = tmp_path / "prompts.txt"
    txt.write_text("make it red --ri a.png --w 64 --ri b b.png\nplain\n")
    assert [p.reference_images for p in load_prompts(txt)] == [["a.png", "b b.png"], []]
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "x"\nreference_images = "a.png"\n'
                    '[[prompt.subset]]\nprompt = "y"\nreference_images = ["a.png", "c.png"]\n')
    assert [p.reference_images for p in load_prompts(toml)] == [["a.png"], ["a.png", "c.png"]]
    models, dataset = tiny  # a missing --ri image stops the run before the first step, naming the file
    with pytest.raises(BadImageError, match="2 images cannot be used:\n  a.png: file not found"):
        cli_runs.run_trainer("network", [*run_args(models, dataset, tmp_path / "out"), *LORA, "--model_type",
                                         "kontext", "--max_train_steps", "1", "--sample_prompts", str(txt)])


def test_a_file_whose_modelspec_says_kontext_trains_as_kontext(tiny, tmp_path):
    from library.formats.safetensors_io import save_file_atomic

    models, toml = tiny
    models = dict(models, flux=tmp_path / "kontext.safetensors")
    save_file_atomic(load_file(str(tiny[0]["flux"])), models["flux"], {"modelspec.architecture": "flux-1-kontext-dev"})
    trainer, code = cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path / "out"), *LORA,
                                                     "--max_train_steps", "1"])  # --model_type left at flux
    assert code == 0 and trainer.kontext and trainer.loss_fn.settings.guidance_scale == 1.0


def test_readme_kontext_command_lines_parse_and_verify():
    import re
    import shlex

    import flux_train
    import flux_train_network
    from conftest import ROOT
    from library.training.arguments import verify_training_args

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Training FLUX.1 Kontext\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[2] for c in commands] == ["flux_train_network.py", "flux_train.py"]
    for argv, entry in zip(commands, (flux_train_network, flux_train)):
        assert argv[:2] == ["accelerate", "launch"]
        args = entry.setup_parser().parse_args(argv[3:])
        verify_training_args(args, entry.COMMAND_LINE)
        assert args.model_type == "kontext" and args.dataset_config == "kontext.toml"


def test_a_frozen_controlnet_is_refused_with_kontext(tiny, tmp_path):
    models, toml = tiny
    with pytest.raises(TrainingError, match="frozen ControlNet does not take FLUX.1 Kontext yet"):
        cli_runs.run_trainer("network", [*run_args(models, toml, tmp_path), *LORA, "--model_type", "kontext",
                                         "--max_train_steps", "1", "--controlnet_model_name_or_path", "cn.safetensors"])
