"""Sample images during training (reference 12.1, 12.4, 18.6): when to render, and rendering the prompt file.

    schedule = SampleSchedule.from_args(args)
    prompts = load_prompts(args.sample_prompts)                          # library/flow/prompts.py, up front
    cache = precompute_prompt_conditioning(models, prompts, placement, args.apply_t5_attn_mask)  # then free TEs
    ...
    if schedule.should_sample(step=global_step):
        sample_images(models, prompts, args.output_dir, args.output_name, placement, step=global_step,
                      cached_conditioning=cache)

Differences from sd-scripts, on purpose: schnell models sample with the unshifted schedule, as inference does
(reference 17 item 22); Python's and NumPy's RNG states are restored as well as torch's; the models' train/eval
flags are restored module by module.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from library.models.variants import ModelVariant
from library.flow.generation import (FluxModels, GenerationSettings, Placement, encode_prompt,
                                     generate_from_conditioning, png_text, save_png, unique_path)
from library.flow.sampling import Conditioning
from library.flow.prompts import SamplePrompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSchedule:
    """When sample images are rendered (reference 12.1). Values <= 0 count as unset."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False
    has_prompts: bool = True  # False without --sample_prompts: never sample

    @classmethod
    def from_args(cls, args) -> "SampleSchedule":
        """From sd-scripts' options: --sample_every_n_steps, --sample_every_n_epochs, --sample_at_first,
        --sample_prompts (missing attributes count as unset)."""

        def positive(name: str) -> int | None:
            value = getattr(args, name, None)
            return int(value) if value is not None and int(value) > 0 else None

        return cls(positive("sample_every_n_steps"), positive("sample_every_n_epochs"),
                   bool(getattr(args, "sample_at_first", False)), bool(getattr(args, "sample_prompts", None)))

    @property
    def enabled(self) -> bool:
        return self.has_prompts and (self.at_first or self.every_n_steps is not None or self.every_n_epochs is not None)

    def should_sample(self, epoch: int | None = None, step: int | None = None, at_first: bool = False) -> bool:
        """Decide for one call of the training loop.

        - `at_first=True` (before training) or `step == 0` in a step call: only with --sample_at_first.
        - `epoch=k` (after epoch k, counted from 1): only with --sample_every_n_epochs n and k % n == 0.
        - `step=s` (after optimiser step s): only with --sample_every_n_steps n and s % n == 0, and only when
          --sample_every_n_epochs is not set (it takes precedence, as in sd-scripts).
        """
        if not at_first and epoch is None and step is None:
            raise ValueError("should_sample needs epoch=, step= or at_first=True")
        if not self.has_prompts:
            return False
        if at_first:
            return self.at_first
        if epoch is not None:
            return self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        if step == 0:
            return self.at_first
        if self.every_n_epochs is not None or self.every_n_steps is None:
            return False
        return step % self.every_n_steps == 0


# ---------------------------------------------------------------------------------------------------------------
# state kept unchanged across sampling


class RngState:
    """Global RNG states (torch CPU, every initialised CUDA device, Python `random`, NumPy) captured at once."""

    def __init__(self):
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


@contextmanager
def eval_mode(*models: torch.nn.Module | None):
    """Put models (None skipped) in eval mode; afterwards every submodule gets its own previous flag back."""
    flags = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


# ---------------------------------------------------------------------------------------------------------------
# conditioning and rendering


def _texts_to_encode(prompts: Iterable[SamplePrompt]) -> list[str]:
    """Distinct prompt texts, and negative prompts that sampling will use (non-empty, scale != 1), in file order."""
    texts: dict[str, None] = {}
    for p in prompts:
        texts.setdefault(p.prompt)
        if p.negative_prompt and p.scale != 1.0:
            texts.setdefault(p.negative_prompt)
    return list(texts)


def precompute_prompt_conditioning(models: FluxModels, prompts: Sequence[SamplePrompt], placement: Placement,
                                   apply_t5_attn_mask: bool) -> dict[str, Conditioning]:
    """Encode every distinct prompt and used negative prompt once (reference 4.3), keyed by the text, so the text
    encoders can be freed when text-encoder outputs are cached. The mask is kept only with apply_t5_attn_mask."""
    with eval_mode(models.clip_l, models.t5xxl):
        return {text: encode_prompt(models, text, placement, apply_t5_attn_mask) for text in _texts_to_encode(prompts)}


def _conditioning(models: FluxModels, text: str, placement: Placement, apply_t5_attn_mask: bool,
                  cache: dict[str, Conditioning] | None) -> Conditioning:
    """Cached outputs when there are some for `text`, else the text encoders."""
    if cache is not None and text in cache:
        c = cache[text]
        to = dict(device=placement.device, dtype=models.compute_dtype)
        mask = c.txt_mask.to(placement.device) if c.txt_mask is not None and apply_t5_attn_mask else None
        return Conditioning(c.txt.to(**to), c.y.to(**to), c.txt_ids.to(**to), mask)
    if models.clip_l is None or models.t5xxl is None or models.tokenizer is None:
        raise ValueError(f"no cached text-encoder outputs for the sample prompt {text!r}, and the text encoders "
                         "are not loaded")
    return encode_prompt(models, text, placement, apply_t5_attn_mask)


def settings_for(prompt: SamplePrompt, seed: int, variant: ModelVariant) -> GenerationSettings:
    """GenerationSettings of a sample prompt: sizes rounded down to 16 (min 64); steps and guidance explicit (the
    model's defaults where the prompt gives none)."""
    width, height = prompt.image_size()
    steps = prompt.sample_steps if prompt.sample_steps is not None else variant.preview_steps
    settings = GenerationSettings(prompt=prompt.prompt, width=width, height=height, steps=steps,
                                  guidance=prompt.guidance_scale, seed=seed,
                                  negative_prompt=prompt.negative_prompt or None, cfg_scale=prompt.scale)
    settings.guidance = settings.resolved_guidance(variant)
    return settings


def sample_image_stem(output_name: str | None, prompt_index: int, seed: int | None, *, epoch: int | None = None,
                      step: int | None = None, timestamp: str | None = None) -> str:
    """`[<name>_]{e000001|000100}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}]` (reference 18.6): e<epoch> after an epoch,
    the global step otherwise."""
    if epoch is None and step is None:
        raise ValueError("a sample image needs an epoch or a step for its name")
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    timestamp = timestamp or time.strftime("%Y%m%d%H%M%S")
    prefix = f"{output_name}_" if output_name else ""
    suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{number}_{prompt_index:02d}_{timestamp}{suffix}"


def sample_images(models: FluxModels, prompts: Sequence[SamplePrompt], output_dir: str | os.PathLike,
                  output_name: str | None, placement: Placement, *, epoch: int | None = None, step: int | None = None,
                  apply_t5_attn_mask: bool = False, cached_conditioning: dict[str, Conditioning] | None = None,
                  seed_rng_state_restore: bool = True, tiled_ae: bool = False, process_index: int = 0,
                  num_processes: int = 1, progress: bool = False,
                  model_for_prompt: Callable[[SamplePrompt], torch.nn.Module] | None = None,
                  write: bool = True) -> list[Path]:
    """Render the prompts into `<output_dir>/sample/` and return the PNG paths, in prompt order.

    `epoch` names the images `e{epoch:06d}` (epoch-end calls), otherwise `step` names them `{step:06d}`.
    Conditioning comes from `cached_conditioning` when it holds the text, else from the text encoders. With several
    processes each renders `prompts[process_index::num_processes]`. Models are in eval mode while sampling, and
    the global RNG states are restored afterwards (unless seed_rng_state_restore is False), so sampling does not
    change the training run's randomness. `model_for_prompt(prompt)` gives the model that renders a prompt (a
    recipe's: the ControlNet recipe steers the transformer with the prompt's `--cn` image); default the transformer.
    `write=False` renders without writing (the other ranks of an engine that shards the weights: every rank must
    run every forward) and returns no paths.
    """
    if epoch is None and step is None:
        raise ValueError("sample_images needs epoch= or step=")
    folder = Path(output_dir) / "sample"
    model_name = output_name or models.variant.architecture
    rng = RngState() if seed_rng_state_restore else None
    paths = []
    try:
        with eval_mode(models.flux, models.ae, models.clip_l, models.t5xxl):
            for prompt in prompts[process_index::num_processes]:
                seed = prompt.seed if prompt.seed is not None else secrets.randbits(32)
                torch.manual_seed(seed)  # as sd-scripts: anything random inside the models follows the seed
                settings = settings_for(prompt, seed, models.variant)
                cond = _conditioning(models, settings.prompt, placement, apply_t5_attn_mask, cached_conditioning)
                negative = None
                if settings.negative_prompt and settings.cfg_scale != 1.0:
                    negative = _conditioning(models, settings.negative_prompt, placement, apply_t5_attn_mask,
                                             cached_conditioning)
                logger.info("sample %d: %dx%d, %d steps, seed %d: %s", prompt.index, settings.width,
                            settings.height, settings.steps, seed, settings.prompt)
                model = model_for_prompt(prompt) if model_for_prompt is not None else models.flux
                with eval_mode(model):
                    image = generate_from_conditioning(replace(models, flux=model), settings, cond, negative,
                                                       placement, tiled_ae, progress)
                if not write:
                    continue
                stem = sample_image_stem(output_name, prompt.index, prompt.seed, epoch=epoch, step=step)
                text = png_text(settings, model_name)
                text.update(sample_index=str(prompt.index), epoch="" if epoch is None else str(epoch),
                            step="" if step is None else str(step))
                folder.mkdir(parents=True, exist_ok=True)
                paths.append(save_png(image, unique_path(folder, stem), text))
    finally:
        if rng is not None:
            rng.restore()
    return paths
