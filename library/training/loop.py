"""The one training loop of the suite: setup -> train -> save -> cleanup, shared by every trainer.

A recipe (library/training/recipes/) subclasses `Trainer` and says only what differs, through the hooks below:
what is trained (`build_trainable`), its optimizer parameter groups, how its weights are saved, which dataset kinds
it reads (`dataset_kinds`), the model the loss and the sample images run (`denoiser`, `model_inputs`,
`sampling_model`), and its command line and memory profile (class attributes). Everything else -- accelerate,
datasets and caches, the epoch loop with gradient accumulation, clipping, NaN checks, logging, sampling,
validation, checkpoints, save/resume and Ctrl-C handling -- lives here once, and knows no recipe.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from library.distributed.choice import accelerator_kwargs, engine_kind, make_engine
from library.distributed.engine import EngineError
from library.flow.matching import seeded_generator
from library.formats.atomic_io import atomic_write, remove_stale_temporaries
from library.formats.metadata import checkpoint_filename, files_to_remove_for_save_last_n, is_epoch_save, state_dirname
from library.formats.safetensors_io import load_tensors, sample_keys, save_file_atomic
from library.training import setup as train_setup
from library.training.arguments import TrainerCommandLine
from library.training.errors import TrainingError
from library.training.fused_optimizers import prepare_optimizer
from library.training.hub import HubError, HubUploader, download_state
from library.training.outputs import check_output_paths, reason, write_or_rescue
from library.training.settings import DatasetKinds, MemoryProfile, RunSettings, StepBudget
from library.training.setup import TrainingModels
from library.training.state_check import verify_state
from library.training.trackers import TrackerError, login, resolve_trackers

logger = logging.getLogger(__name__)


STATE_TRAINABLE = "trainable_weights.safetensors"  # the trained weights inside a --save_state folder


@contextmanager
def engine_refusals():
    """A distributed engine's refusal (EngineError: a combination it cannot run) as the run's one-line error."""
    try:
        yield
    except EngineError as e:
        raise TrainingError(str(e)) from None


class Trainer:
    tracker_name = "network_train"
    command_line: TrainerCommandLine  # the recipe's command line (library/training/recipes/command_lines.py)
    memory_profile: MemoryProfile | None = None  # what the memory planner simulates; None: not planned
    trains_text_encoder = False  # text encoded live with gradients (a recipe sets it in build_trainable: TE LoRA)

    def __init__(self, args, settings: RunSettings | None = None):
        """`settings`: resolved by the caller (library/cli resolves --blocks_to_swap auto with the planner)."""
        self.args = args
        self.settings = settings or RunSettings.from_args(args, fp8_allowed=self.command_line.fp8_base,
                                                          training=self.command_line.training)
        self.seed = self.settings.seed
        self.global_step = 0
        self.epoch = 1
        self.stop_requested: str | None = None
        self.last_saved: list[Path] = []
        self.losses: list[float] = []  # loss of every optimizer step, for callers and tests
        self.skipped_images: dict[str, str] = {}  # images that failed to decode mid-run (--skip_bad_images)
        self.hub = None  # HubUploader with --huggingface_repo_id (main process)

    # --- hooks for subclasses -------------------------------------------------------------------------------------

    def build_trainable(self, models: TrainingModels) -> list[torch.nn.Module]:
        """Create what is trained; return the modules whose mode follows training/eval."""
        raise TypeError(f"{type(self).__name__} must define build_trainable")

    def param_groups(self) -> tuple[list, list[str]]:
        """(optimizer parameter groups, a description per group for logging)."""
        raise TypeError(f"{type(self).__name__} must define param_groups")

    def save_weights(self, path: Path, epoch: int, step: int, final: bool) -> None:
        raise TypeError(f"{type(self).__name__} must define save_weights")

    def dataset_kinds(self) -> DatasetKinds:
        """Which dataset kinds the recipe reads and what conditioning images are for: by default DreamBooth and
        fine-tuning subsets, and ControlNet subsets only as loss masks (with --masked_loss)."""
        masked = bool(getattr(self.args, "masked_loss", False))
        return DatasetKinds(support_controlnet=masked, conditioning_as_mask=masked)

    def denoiser(self) -> torch.nn.Module:
        """The model the loss runs (the transformer's call signature): the transformer, or a recipe's wrapper
        around it (the ControlNet recipe's ControlledFlux)."""
        return self.models.flux

    def model_inputs(self, batch) -> dict:
        """Extra keyword inputs of `denoiser()` taken from a batch (the ControlNet recipe: its conditioning images)."""
        return {}

    def sampling_model(self, prompt) -> torch.nn.Module:
        """The model that renders one sample prompt (the ControlNet recipe: steered by the prompt's --cn image)."""
        return self.models.flux

    def sampling_context(self):
        """A context manager around sample images (the LoRA recipe: its --assistant_lora switched off)."""
        return nullcontext()

    def checkpointed_modules(self) -> list[torch.nn.Module]:
        """Modules whose weights accelerate's save_state keeps. None: accelerate writes registered modules as
        pickles and loads them with full unpickling, and a state folder is a file users pass around; the trainable
        weights go into a safetensors file of their own instead (save_state_weights / load_state_weights)."""
        return []

    def save_state_weights(self, folder: Path) -> None:
        """Write the trainable weights into a state folder (main process only)."""
        tensors = {f"{i}.{k}": v.detach().to("cpu").clone()
                   for i, m in enumerate(self.trainable_modules) for k, v in self.engine.state_dict(m).items()}
        save_file_atomic(tensors, folder / STATE_TRAINABLE)

    @torch.no_grad()
    def load_state_weights(self, folder: Path) -> None:
        """Read back what save_state_weights wrote (every process), strictly."""
        path = folder / STATE_TRAINABLE
        if not path.exists():
            raise TrainingError(f"--resume {folder}: no {STATE_TRAINABLE} (a state saved by another trainer or "
                                "an older version?)")
        tensors = load_tensors(path)
        expected = {f"{i}.{k}" for i, m in enumerate(self.trainable_modules) for k in m.state_dict()}
        if set(tensors) != expected:
            raise TrainingError(f"{path}: its tensors do not match what is being trained (differing: "
                                f"{sample_keys(set(tensors) ^ expected, 3)}); were the network options changed?")
        for i, m in enumerate(self.trainable_modules):
            prefix = f"{i}."
            self.engine.load_state_dict(m, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def state_weight_shapes(self) -> tuple[str, dict[str, tuple[int, ...]]]:
        """(file name inside a state folder, {tensor name: shape}) of what save_state_weights writes, so a state
        is checked against this run before anything is loaded."""
        return STATE_TRAINABLE, {f"{i}.{k}": tuple(v.shape) for i, m in enumerate(self.trainable_modules)
                                 for k, v in m.state_dict().items()}

    def state_mismatch(self, key: str, saved: tuple[int, ...], expected: tuple[int, ...]) -> str:
        """Which setting makes a saved trainable tensor's shape differ from this run's (for the one-line error)."""
        return "the state was saved with other options for what is trained; resume with the same ones"

    def transformer_dtype(self) -> torch.dtype | None:
        """The transformer's dtype when it is not the weight dtype (None: the weight dtype)."""
        return None

    def reference_model(self):
        """A context manager that switches the trainable delta off (for differential output preservation)."""
        return None

    def checkpoint_extension(self) -> str:
        return ".safetensors"

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            self.setup()
            self.train()
            if self.stop_requested:
                return 130
            self.finish()
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.hub is not None:
                self.hub.wait()  # background uploads finish before the process ends
            if getattr(self, "accelerator", None) is not None:
                self.accelerator.end_training()

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = signal.Signals(signum).name
        logger.warning("%s received: saving a resumable state after the current step", self.stop_requested)

    def setup(self) -> None:
        args = self.args
        train_setup.check_supported(args)
        try:
            self.trackers, tracker_kwargs = resolve_trackers(args)
        except TrackerError as e:
            raise TrainingError(str(e)) from None
        kind = engine_kind(args)
        with engine_refusals():
            self.accelerator = train_setup.make_accelerator(args, self.trackers, accelerator_kwargs(kind, args))
            swaps_or_fuses = bool(self.settings.blocks_to_swap or getattr(args, "fused_backward_pass", False)
                                  or getattr(args, "blockwise_fused_optimizers", False))
            self.engine = make_engine(kind, self.accelerator, args, swaps_or_fuses)
            self.engine.check(self)
        if self.accelerator.is_main_process:  # leftovers of a run killed mid-save (only the main process saves)
            for folder in (args.output_dir, args.resume):  # checkpoints, samples/, state folders
                if folder:
                    remove_stale_temporaries(folder, subfolders=True)
        set_seed(self.seed)
        self.train_group, self.val_group = train_setup.build_dataset_groups(args, self.seed, self.dataset_kinds())
        # every folder the run writes, before the models load: a bad path must not cost a whole run
        check_output_paths(args, {i.absolute_path.parent for g in (self.train_group, self.val_group) if g
                                  for i in g.items})
        # a recipe whose transformer may be stored in fp8 keeps it frozen whole, so it may be a quantized file too
        self.models = train_setup.load_models(args, self.settings, self.accelerator, self.transformer_dtype(),
                                              quantized_base_allowed=self.command_line.fp8_base)
        self.trainable_modules = self.build_trainable(self.models)
        with engine_refusals():
            self.engine.shard(self)
        self.hub = HubUploader.from_args(args) if self.accelerator.is_main_process else None
        self.block_swappers = train_setup.enable_block_swap(args, self.settings.blocks_to_swap, self.models,
                                                            self.accelerator)
        train_setup.compile_blocks(args, self.models)
        train_setup.prepare_caches(args, self.accelerator, self.models, self.train_group, self.val_group)
        self.samples = train_setup.prepare_sampling(args, self.models, self.accelerator)
        self.models.free_unneeded(args, self.accelerator.device, keep_text_encoders=self.trains_text_encoder)

        acc = self.accelerator
        self.sampler = train_setup.make_sampler(self.train_group, acc)
        self.budget = StepBudget.from_counts(args, self.sampler.batches_per_epoch)
        groups, self.lr_descriptions = self.param_groups()
        if not any(g["params"] if isinstance(g, dict) else True for g in groups):
            raise TrainingError("nothing to train: every parameter group has a learning rate of 0 (check "
                                "--learning_rate, --unet_lr, --text_encoder_lr and the network's lr arguments)")
        self.trainable_params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        self.trained_model = self.engine.attach(self)  # what the loss calls: the denoiser, or the engine's wrapper
        self.make_optimizer(groups)
        logger.info("distributed engine: %s", self.engine.describe())
        acc.register_for_checkpointing(*self.checkpointed_modules())
        self.loss_fn = train_setup.make_loss_computer(args, self.models, acc, self.trained_model, self.model_inputs,
                                                      self.reference_model, self.trains_text_encoder)
        self.loader = train_setup.make_loader(args, self.seed, self.train_group, self.sampler)
        self._resume()
        if acc.is_main_process and self.trackers:
            login(args, self.trackers)
            acc.init_trackers(args.log_tracker_name or self.tracker_name,
                              config=train_setup.tracker_config(args, self.seed), init_kwargs=tracker_kwargs)
        logger.info("training: %d images with repeats, %d batches per epoch per process, %d steps per epoch, "
                    "%d epochs, %d steps", self.train_group.num_train_images, self.sampler.batches_per_epoch,
                    self.budget.steps_per_epoch, self.budget.num_epochs, self.budget.max_train_steps)

    def make_optimizer(self, groups: list) -> None:
        """Optimizer and LR scheduler, prepared by accelerate; with --fused_backward_pass or
        --blockwise_fused_optimizers they step inside backward (library/training/fused_optimizers.py)."""
        ids = {id(p) for p in self.trainable_params}
        named = [(n, p) for m in self.trainable_modules for n, p in m.named_parameters() if id(p) in ids]
        self.optimizer_name, self.optimizer_text, self.optimizer, self.lr_scheduler, self.fused_optimizer = \
            prepare_optimizer(self.args, self.accelerator, groups, named, self.budget.max_train_steps,
                              prepare=self.engine.prepare, on_gradients=self.engine.on_gradients)

    # --- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> None:
        bar = tqdm(total=self.budget.max_train_steps, initial=self.global_step, desc="steps",
                   disable=not self.accelerator.is_local_main_process, smoothing=0)
        loss_csv = self._open_loss_csv()
        try:
            self._train(bar, loss_csv)
        finally:
            bar.close()  # an error then starts on a line of its own
            if loss_csv:
                loss_csv.close()

    def _train(self, bar, loss_csv) -> None:
        acc = self.accelerator
        max_steps = self.budget.max_train_steps
        self._maybe_sample(at_first=True)
        recent: list[float] = []
        for epoch in range(self.epoch, self.budget.num_epochs + 1):
            self.epoch = epoch
            skip = self._skip_batches if epoch == self._resume_epoch else 0
            self.sampler.set_epoch(epoch, skip)
            self._set_train_mode(True)
            epoch_losses = []
            skipped_before = len(self.skipped_images)
            for position, batch in enumerate(self.loader, start=skip):
                self._note_skipped(batch.skipped_images)
                with self.engine.accumulate(self), acc.autocast():
                    loss = self.loss_fn(batch, generator=self._batch_generator(epoch, position))
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {loss.item()} at step {self.global_step + 1} (epoch {epoch}); training "
                            f"stopped. Files saved so far are kept: {', '.join(map(str, self.last_saved)) or 'none'}. "
                            "Lower the learning rate, use bf16 instead of fp16, or check the data")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        self._sync_and_clip()
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                recent.append(loss.detach().item())
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                step_loss = sum(recent) / len(recent)
                recent.clear()
                epoch_losses.append(step_loss)
                self.losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                if loss_csv:
                    loss_csv.write(f"{self.global_step},{step_loss:.6g},{self.lr_scheduler.get_last_lr()[0]:.6g}\n")
                    loss_csv.flush()
                self._log({"loss/current": step_loss,
                           "loss/average": sum(epoch_losses) / len(epoch_losses), **self._lrs()})
                self.after_step()
                if self.stop_requested:
                    self._save_state(self._state_dir(step=self.global_step))
                    logger.warning("stopped by %s at step %d; resume with --resume %s", self.stop_requested,
                                   self.global_step, self._state_dir(step=self.global_step))
                    return
                if self.global_step >= max_steps:
                    break
            if epoch_losses:
                self._log({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, step=epoch)
            if len(self.skipped_images) > skipped_before:
                logger.warning("epoch %d: %d image(s) could not be decoded and were skipped (%d in this run): %s",
                               epoch, len(self.skipped_images) - skipped_before, len(self.skipped_images),
                               ", ".join(list(self.skipped_images)[skipped_before:]))
            self.after_epoch(epoch)
            if self.global_step >= max_steps:
                break

    def _batch_generator(self, epoch: int, position: int) -> torch.Generator:
        """The noise, timesteps and latent samples of one batch come from a generator seeded by the run's seed, the
        epoch and the batch's place in the epoch's order (rank r's i-th batch is batch i * ranks + r), not from a
        stream each process draws in turn: N processes then train exactly what one process does with N-fold
        gradient accumulation, and a resumed run draws what the uninterrupted one drew."""
        acc = self.accelerator
        index = position * acc.num_processes + acc.process_index
        return seeded_generator(self.seed, epoch, index)

    def _note_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """Log each image that failed to decode mid-run once (DataLoader workers cannot share what they logged)."""
        for path, why in skipped:
            if path not in self.skipped_images:
                self.skipped_images[path] = why
                logger.warning("skipping image %s: %s (--skip_bad_images: another image of its bucket takes its "
                               "place)", path, why)

    def _open_loss_csv(self):
        """--loss_csv, appended to (a resumed run continues it); written by the main process only."""
        path = self.args.loss_csv
        if not path or not self.accelerator.is_main_process:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        f = path.open("a", encoding="utf-8")
        if new:
            f.write("step,loss,lr\n")
        return f

    def _set_train_mode(self, training: bool) -> None:
        for m in self.trainable_modules:
            m.train(training)
        if self.args.gradient_checkpointing:
            self.models.flux.train(training)  # checkpointing runs in training mode only

    def _sync_and_clip(self) -> None:
        self.engine.before_step(self.trainable_params)  # gradients complete and averaged on every process
        if self.args.max_grad_norm:
            self.engine.clip_grad_norm_(self.trainable_params, self.args.max_grad_norm)

    def _lrs(self) -> dict[str, float]:
        return {f"lr/{d}": lr for d, lr in zip(self.lr_descriptions, self.lr_scheduler.get_last_lr())}

    def _log(self, values: dict, step: int | None = None) -> None:
        if self.trackers:
            self.accelerator.log(values, step=self.global_step if step is None else step)

    # --- after steps and epochs -----------------------------------------------------------------------------------

    def after_step(self) -> None:
        args, step = self.args, self.global_step
        self._maybe_sample(step=step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < self.budget.max_train_steps:
            self._save_checkpoint(step=step)
        if getattr(args, "validate_every_n_steps", None) and step % args.validate_every_n_steps == 0:
            self.validate("step")

    def after_epoch(self, epoch: int) -> None:
        args = self.args
        self._maybe_sample(epoch=epoch)
        if is_epoch_save(args, epoch, self.budget.num_epochs):
            self._save_checkpoint(epoch=epoch)
        every = getattr(args, "validate_every_n_epochs", None) or 1
        if self.val_group is not None and epoch % every == 0:
            self.validate("epoch")

    def _maybe_sample(self, **when) -> None:
        if self.samples is not None and self.samples.schedule.should_sample(**when):
            with self.sampling_context():
                self.samples.run(self, **{k: v for k, v in when.items() if k != "at_first"})

    def validate(self, kind: str) -> float | None:
        """Validation loss at fixed sigmas and seeded noise, so values compare across steps."""
        if self.val_group is None:
            return None
        self._set_train_mode(False)
        value = train_setup.validation_loss(self.args, self.seed, self.val_group, self.loss_fn, self.accelerator)
        self._set_train_mode(True)
        self._log({f"loss/validation/{kind}_average": value})
        logger.info("validation loss (%s %d): %.5f", kind, self.global_step if kind == "step" else self.epoch, value)
        return value

    # --- saving and resuming --------------------------------------------------------------------------------------

    def _checkpoint_path(self, epoch: int | None = None, step: int | None = None) -> Path:
        return Path(self.args.output_dir) / checkpoint_filename(self.args.output_name, self.checkpoint_extension(),
                                                                epoch=epoch, step=step)

    def _state_dir(self, epoch: int | None = None, step: int | None = None) -> Path:
        return Path(self.args.output_dir) / state_dirname(self.args.output_name, epoch=epoch, step=step)

    def _save_checkpoint(self, epoch: int | None = None, step: int | None = None) -> None:
        acc, args = self.accelerator, self.args
        acc.wait_for_everyone()
        path = self._checkpoint_path(epoch=epoch, step=step)
        rescued: list[str] = []
        with self.engine.full_weights(self.trainable_modules):  # every process takes part in a sharded gather
            if acc.is_main_process:
                self._save_weights(path, self.epoch, self.global_step, False, rescued)
        if args.save_state:
            self._save_state(self._state_dir(epoch=epoch, step=step), rescued)
        self._stop_if_rescued(rescued)
        if acc.is_main_process:
            for old in files_to_remove_for_save_last_n(args, Path(args.output_dir), self.checkpoint_extension(),
                                                       epoch=epoch, step=step, num_train_epochs=self.budget.num_epochs):
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.exists():
                    old.unlink()

    def _save_weights(self, path: Path, epoch: int, step: int, final: bool, rescued: list[str]) -> None:
        """Save the trained weights (main process); when `path` cannot be written they go to a rescue file, noted
        in `rescued`."""
        place, error = write_or_rescue(path, lambda p: self.save_weights(p, epoch, step, final=final))
        self.last_saved.append(place)
        logger.info("saved %s", place)
        if error is not None:
            rescued.append(f"could not write {path} ({reason(error)}); the weights are saved in {place} instead")
        elif self.hub is not None:
            self.hub.upload(path, final=final)

    def _save_state(self, folder: Path, rescued: list[str] | None = None) -> None:
        """Optimizer, scheduler, RNG and trainable weights (accelerate), plus our epoch/step bookkeeping; when
        `folder` cannot be written, into a rescue folder, noted in `rescued` (without a list: stop at once)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        place, error = write_or_rescue(folder, self._write_state)
        if acc.is_main_process:
            logger.info("saved state %s", place)
            if error is None and self.hub is not None:
                self.hub.upload(folder)
        if error is not None:
            notes = [f"could not write {folder} ({reason(error)}); the resumable state is saved in {place} "
                     f"instead (resume with --resume {place})"]
            if rescued is None:
                self._stop_if_rescued(notes)
            rescued += notes

    def _write_state(self, folder: Path) -> None:
        acc = self.accelerator
        self.engine.save_state(folder)
        if self.engine.keeps_trainable_in_state():
            with self.engine.full_weights(self.trainable_modules):
                if acc.is_main_process:
                    self.save_state_weights(folder)
        if acc.is_main_process:
            position = {"current_epoch": self.epoch, "current_step": self.global_step, "seed": self.seed}
            atomic_write(folder / "train_state.json", lambda tmp: Path(tmp).write_text(json.dumps(position)))

    def _stop_if_rescued(self, rescued: list[str]) -> None:
        """A save that had to go elsewhere stops the run: the output folder is broken (or full), and what was
        trained is safe only where the message says."""
        if rescued:
            raise TrainingError(f"saving at step {self.global_step} failed, training stopped: {'; '.join(rescued)}")

    def _resume(self) -> None:
        """Where the run starts: a --resume state (exactly where it stopped: step, schedule, RNG, data position) and/or
        --initial_step / --initial_epoch, which override the step. Unlike sd-scripts, a run started at step N always
        counts on from N and ends at --max_train_steps (never more steps than the budget); its data is skipped with
        --skip_until_initial_step (or when resuming a state), otherwise its epoch starts from the beginning."""
        self._resume_epoch, self._skip_batches = 1, 0
        args = self.args
        resumed = None
        if args.resume:
            folder = Path(args.resume)
            if getattr(args, "resume_from_huggingface", False):
                try:
                    folder = download_state(args.resume, args.huggingface_token)
                except HubError as e:
                    raise TrainingError(str(e)) from None
            resumed = self._verify_state(folder)
            try:
                self.engine.load_state(folder)
            except (ValueError, RuntimeError, KeyError, OSError) as e:
                raise TrainingError(f"--resume {folder}: the optimizer or scheduler state does not fit this run "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume with the "
                                    "--optimizer_type, --lr_scheduler and options of the run that saved it") from None
            if self.engine.keeps_trainable_in_state():
                self.load_state_weights(folder)
        initial, initial_epoch = getattr(args, "initial_step", None), getattr(args, "initial_epoch", None)
        if initial is None and initial_epoch is not None:
            initial = (initial_epoch - 1) * self.budget.steps_per_epoch
        step = initial if initial is not None else resumed
        if not step:
            return
        source = f"--resume {args.resume}" if initial is None else (
            f"--initial_step {initial}" if getattr(args, "initial_step", None) is not None
            else f"--initial_epoch {initial_epoch}")
        if step >= self.budget.max_train_steps:
            raise TrainingError(f"{source}: the run would start at step {step}, already at or past "
                                f"--max_train_steps {self.budget.max_train_steps}")
        if resumed is None:
            self._advance_lr_schedule(step)
        self.global_step = step
        done_epochs, steps_in_epoch = divmod(step, self.budget.steps_per_epoch)
        self.epoch = self._resume_epoch = done_epochs + 1
        skip = resumed is not None or getattr(args, "skip_until_initial_step", False)
        self._skip_batches = steps_in_epoch * args.gradient_accumulation_steps if skip else 0
        logger.info("starting at step %d (%s): epoch %d, skipping %d batches", step, source, self.epoch,
                    self._skip_batches)

    def _verify_state(self, folder: Path) -> int:
        """Check a --resume state folder before anything is loaded from it (library/training/state_check.py);
        returns its step."""
        acc = self.accelerator
        archives = self.engine.state_archives()
        # without our weights file the engine's checkpoint (one of the archives) holds them: the engine checks it
        name, expected = self.state_weight_shapes() if self.engine.keeps_trainable_in_state() else (None, {})
        step = verify_state(folder, name, expected, self.state_mismatch, archives,
                            folder / f"random_states_{acc.process_index}.pkl",
                            inexact=bool(getattr(self.args, "resume_inexact", False)))
        with engine_refusals():  # the engine's own files (DeepSpeed's checkpoint, FSDP2's shards): processes, shapes
            self.engine.check_state(folder)
        return step

    def _advance_lr_schedule(self, steps: int) -> None:
        """Put a fresh LR schedule where it would be after `steps` optimizer steps."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about scheduler steps before any optimizer step
            for _ in range(steps):
                self.lr_scheduler.step()

    def finish(self) -> None:
        acc, args = self.accelerator, self.args
        acc.wait_for_everyone()
        rescued: list[str] = []
        if args.save_state or getattr(args, "save_state_on_train_end", False):
            self._save_state(self._state_dir(), rescued)
        with self.engine.full_weights(self.trainable_modules):
            if acc.is_main_process:
                self._save_weights(self._checkpoint_path(), self.budget.num_epochs, self.global_step, True, rescued)
        self._stop_if_rescued(rescued)
