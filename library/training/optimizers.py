"""Optimizer options and the optimizer factory (reference 1.9 and 15.1), with sd-scripts' names and behaviour.

`get_optimizer(args, params)` returns `(name, args_text, optimizer)`: `name` is `<module>.<Class>` of the class
used and `args_text` the `k=v,...` text of the keyword arguments given to it besides the parameters and the LR;
`optimizer_metadata_text` joins them into the `ss_optimizer` value (`torch.optim.adamw.AdamW(weight_decay=0.01)`).

Optional packages (bitsandbytes, lion-pytorch, prodigyopt, dadaptation, schedulefree) are imported only when the
chosen optimizer needs them, and a missing one is reported with the pip package to install.

Differences from sd-scripts, on the side of failing early: malformed `--optimizer_args` items, duplicated keys and
`lr=` inside `--optimizer_args` are errors naming the item; `true`/`false`/`none` in any case are read as Python
literals (sd-scripts passes the string "false", which is truthy); a bare `torch.optim` class name is matched
case-insensitively.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from library.formats.command_line import fraction, non_negative_float, positive_int

logger = logging.getLogger(__name__)


class OptimizerError(ValueError):
    """A wrong optimizer or scheduler option, said in one line."""


OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "Lion8bit",
                   "PagedLion8bit", "Lion", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint",
                   "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy",
                   "Adafactor", "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")


# --- command line ---------------------------------------------------------------------------------------------


def steps_or_fraction(value: str) -> int | float:
    """argparse type of --lr_warmup_steps / --lr_decay_steps: steps (int), a fraction < 1 of the total, or "x%"."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return percent / 100.0
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a fraction below 1 or a percentage") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    if number < 1 and number != 0:
        return number
    if number != int(number):
        raise argparse.ArgumentTypeError(f"{value!r}: steps must be a whole number (fractions must be below 1)")
    return int(number)


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add sd-scripts' optimizer and LR scheduler options (names, types and defaults of reference 1.9)."""
    g = parser.add_argument_group("optimizer and learning rate scheduler")
    add = g.add_argument
    add("--optimizer_type", type=str, default="",
        help=f"optimizer: {', '.join(OPTIMIZER_NAMES)} (AdamW when empty; case-insensitive), a torch.optim class "
             "name or a module.Class path")
    add("--use_8bit_adam", action="store_true", help="legacy: same as --optimizer_type AdamW8bit (bitsandbytes)")
    add("--use_lion_optimizer", action="store_true", help="legacy: same as --optimizer_type Lion (lion-pytorch)")
    add("--learning_rate", type=non_negative_float, default=2e-6, help="learning rate (default: 2e-6)")
    add("--max_grad_norm", type=non_negative_float, default=1.0,
        help="gradient clipping norm; 0 disables clipping (default: 1.0)")
    add("--optimizer_args", type=str, default=None, nargs="*",
        help='extra optimizer arguments as key=value Python literals, e.g. "weight_decay=0.01 betas=(0.9,0.99)"')
    add("--lr_scheduler_type", type=str, default="",
        help="custom scheduler class: a torch.optim.lr_scheduler name or a module.Class path")
    add("--lr_scheduler_args", type=str, default=None, nargs="*",
        help='extra scheduler arguments as key=value Python literals, e.g. "T_max=100"')
    add("--lr_scheduler", type=str, default="constant",
        help="scheduler: constant (default), constant_with_warmup, linear, cosine, cosine_with_restarts, "
             "polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor")
    add("--lr_warmup_steps", type=steps_or_fraction, default=0,
        help="warm-up optimizer steps, or a fraction (< 1) or percentage (\"10%%\") of the training steps "
             "(default: 0)")
    add("--lr_decay_steps", type=steps_or_fraction, default=0,
        help="decay steps of warmup_stable_decay, or a fraction (< 1) or percentage of the training steps "
             "(default: 0)")
    add("--lr_scheduler_num_cycles", type=positive_int, default=1,
        help="restarts of cosine_with_restarts; cycles of cosine_with_min_lr / warmup_stable_decay (default: 1)")
    add("--lr_scheduler_power", type=float, default=1,
        help="power of the polynomial scheduler (default: 1)")
    add("--fused_backward_pass", action="store_true",
        help="step Adafactor per parameter during the backward pass to save memory (full fine-tuning and "
             "ControlNet; needs --optimizer_type adafactor and --gradient_accumulation_steps 1)")
    add("--lr_scheduler_timescale", type=positive_int, default=None,
        help="time scale of inverse_sqrt in optimizer steps (default: the warm-up steps, or 10000 without one)")
    add("--lr_scheduler_min_lr_ratio", type=fraction, default=None,
        help="minimum LR as a ratio of the initial LR, for cosine_with_min_lr and warmup_stable_decay")


def parse_kv_args(items: list[str] | str | None, what: str) -> dict[str, Any]:
    """Parse `key=value` items (--optimizer_args, --lr_scheduler_args) into a dict.

    Values are Python literals (`0.01`, `(0.9,0.99)`, `True`, `'x'`); `true`/`false`/`none` in any case are read as
    those literals too, and anything else that is not a literal stays a string, as in sd-scripts. `what` names the
    option in errors.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise OptimizerError(f"{what}: {item!r} is not key=value (e.g. weight_decay=0.01)")
        if key in out:
            raise OptimizerError(f"{what}: {key} is given twice ({item!r})")
        out[key] = _literal(text)
    return out


def _literal(text: str) -> Any:
    lowered = {"true": True, "false": False, "none": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# --- the optimizer table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """Where a named optimizer lives and what sd-scripts adds to its arguments."""

    module: str
    cls: str
    package: str | None = None  # pip package of an optional dependency
    defaults: dict = field(default_factory=dict)  # added to the kwargs when absent (and shown in the args text)
    fixed: dict = field(default_factory=dict)  # always passed, not shown
    lr_free: bool = False  # D-Adaptation / Prodigy: LR around 1.0, one LR for all groups


_BNB = "bitsandbytes.optim"
_SGD_NESTEROV = dict(defaults={"momentum": 0.9}, fixed={"nesterov": True})
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW"),
    "adamw8bit": OptimizerSpec(_BNB, "AdamW8bit", "bitsandbytes"),
    "pagedadamw8bit": OptimizerSpec(_BNB, "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw": OptimizerSpec(_BNB, "PagedAdamW", "bitsandbytes"),
    "pagedadamw32bit": OptimizerSpec(_BNB, "PagedAdamW32bit", "bitsandbytes"),
    "lion8bit": OptimizerSpec(_BNB, "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": OptimizerSpec(_BNB, "PagedLion8bit", "bitsandbytes"),
    "sgdnesterov": OptimizerSpec("torch.optim", "SGD", **_SGD_NESTEROV),
    "sgdnesterov8bit": OptimizerSpec(_BNB, "SGD8bit", "bitsandbytes", **_SGD_NESTEROV),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "dadaptation": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", lr_free=True),
    "dadaptadampreprint": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation",
                                        lr_free=True),
    "dadaptadagrad": OptimizerSpec("dadaptation", "DAdaptAdaGrad", "dadaptation", lr_free=True),
    "dadaptadam": OptimizerSpec("dadaptation", "DAdaptAdam", "dadaptation", lr_free=True),
    "dadaptadan": OptimizerSpec("dadaptation", "DAdaptAdan", "dadaptation", lr_free=True),
    "dadaptadanip": OptimizerSpec("dadaptation.experimental", "DAdaptAdanIP", "dadaptation", lr_free=True),
    "dadaptlion": OptimizerSpec("dadaptation", "DAdaptLion", "dadaptation", lr_free=True),
    "dadaptsgd": OptimizerSpec("dadaptation", "DAdaptSGD", "dadaptation", lr_free=True),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt", lr_free=True),
    "adafactor": OptimizerSpec("transformers.optimization", "Adafactor", "transformers"),
    "radamschedulefree": OptimizerSpec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "adamwschedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": OptimizerSpec("schedulefree", "SGDScheduleFree", "schedulefree"),
}


def resolve_optimizer_type(args: argparse.Namespace) -> str:
    """The effective --optimizer_type after the legacy switches (`AdamW` when nothing is given)."""
    optimizer_type = (getattr(args, "optimizer_type", None) or "").strip()
    use_8bit_adam = getattr(args, "use_8bit_adam", False)
    use_lion = getattr(args, "use_lion_optimizer", False)
    if use_8bit_adam and use_lion:
        raise OptimizerError("--use_8bit_adam and --use_lion_optimizer are both given; use one --optimizer_type")
    for flag, on, legacy_type in (("--use_8bit_adam", use_8bit_adam, "AdamW8bit"),
                                  ("--use_lion_optimizer", use_lion, "Lion")):
        if on:
            if optimizer_type:
                raise OptimizerError(f"{flag} and --optimizer_type {optimizer_type} are both given; "
                                     f"{flag} means --optimizer_type {legacy_type}: keep only one")
            return legacy_type
    return optimizer_type or "AdamW"


def import_class(dotted: str, what: str, package: str | None = None) -> type:
    """Import `module.Class`; a missing module names the pip package (`package`, or the top-level module)."""
    module_name, _, cls_name = dotted.rpartition(".")
    if not module_name:
        raise OptimizerError(f"{what} {dotted!r}: expected module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        pip_name = package or module_name.split(".")[0]
        raise OptimizerError(f"{what} {dotted} needs the package {pip_name!r}, which could not be imported ({e}); "
                             f"install it with: pip install {pip_name}") from e
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise OptimizerError(f"{what} {dotted}: module {module_name} has no {cls_name!r}") from None


def _torch_optim_class(name: str) -> type:
    import torch

    if hasattr(torch.optim, name) and isinstance(getattr(torch.optim, name), type):
        return getattr(torch.optim, name)
    matches = [n for n in dir(torch.optim) if n.lower() == name.lower() and isinstance(getattr(torch.optim, n), type)]
    if len(matches) == 1:
        return getattr(torch.optim, matches[0])
    raise OptimizerError(f"unknown --optimizer_type {name!r}: not one of {', '.join(OPTIMIZER_NAMES)}, not a "
                         "torch.optim class; give a module.Class path for other optimizers")


# --- the factory --------------------------------------------------------------------------------------------------


def get_optimizer(args: argparse.Namespace, trainable_params: Iterable) -> tuple[str, str, Any]:
    """Build the optimizer of --optimizer_type for `trainable_params` (tensors or parameter-group dicts).

    Returns `(optimizer_name, optimizer_args_text, optimizer)` as sd-scripts does: `<module>.<Class>` of the class,
    and `k=v,...` of the keyword arguments passed besides the parameters and the LR (including sd-scripts' added
    defaults such as `momentum=0.9` for SGDNesterov and `relative_step=True` for Adafactor).

    Adafactor with relative_step (its default) computes its own LR: the LR is passed as None, group LRs are dropped
    and its schedule becomes `adafactor:<learning_rate>` (reference 15.1; `lr_schedulers.scheduler_name`).
    """
    optimizer_type = resolve_optimizer_type(args)
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    if "lr" in kwargs:
        raise OptimizerError("--optimizer_args: give the learning rate with --learning_rate, not lr=")
    params = list(trainable_params)
    lr = args.learning_rate
    key = optimizer_type.lower()

    if getattr(args, "fused_backward_pass", False):
        if key != "adafactor":
            raise OptimizerError(f"--fused_backward_pass works only with --optimizer_type Adafactor, "
                                 f"not {optimizer_type}")
        if (getattr(args, "gradient_accumulation_steps", 1) or 1) != 1:
            raise OptimizerError("--fused_backward_pass needs --gradient_accumulation_steps 1")

    spec = OPTIMIZERS.get(key)
    if spec is not None:
        cls = import_class(f"{spec.module}.{spec.cls}", f"--optimizer_type {optimizer_type}:", spec.package)
        for k, v in spec.defaults.items():
            if k not in kwargs:
                logger.info("%s: %s=%s by default", optimizer_type, k, v)
                kwargs[k] = v
        if spec.lr_free:
            _warn_lr_free(optimizer_type, lr, params)
        if key == "adafactor":
            lr = _prepare_adafactor(args, kwargs, params)
        fixed = dict(spec.fixed)
    else:
        cls = import_class(optimizer_type, "--optimizer_type") if "." in optimizer_type \
            else _torch_optim_class(optimizer_type)
        fixed = {}

    logger.info("optimizer %s.%s, learning rate %s, arguments %s", cls.__module__, cls.__name__, lr, kwargs)
    try:
        optimizer = cls(params, lr=lr, **fixed, **kwargs)
    except TypeError as e:
        raise OptimizerError(f"--optimizer_type {optimizer_type}: {cls.__module__}.{cls.__name__} rejects the "
                             f"arguments {kwargs} ({e})") from e
    name = f"{cls.__module__}.{cls.__name__}"
    _check_fp16_eps(args, optimizer, name)
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return name, args_text, optimizer


def _check_fp16_eps(args, optimizer, name: str) -> None:
    """torch's Adam family computes in the parameters' dtype: with --full_fp16 an eps below fp16's smallest value
    (6e-8; the default 1e-8) becomes 0, and a zero gradient (every lora_down at step 1) gives 0/0 = NaN."""
    if not getattr(args, "full_fp16", False) or not name.startswith("torch.optim."):
        return
    import torch

    eps = {g.get("eps") for g in optimizer.param_groups}
    if any(isinstance(e, float) and torch.tensor(e, dtype=torch.float16).item() == 0 for e in eps):
        raise OptimizerError(f"--full_fp16 with {name}: its eps {min(e for e in eps if isinstance(e, float))} is 0 "
                             "in fp16, so the first step divides 0 by 0 and the weights become NaN. Use an 8-bit "
                             "optimizer (fp32 states, e.g. AdamW8bit), --full_bf16, or --optimizer_args eps=1e-4")


def optimizer_metadata_text(optimizer_name: str, optimizer_args_text: str) -> str:
    """The `ss_optimizer` metadata value: `<module>.<Class>` plus `(k=v,...)` when there are arguments."""
    return f"{optimizer_name}({optimizer_args_text})" if optimizer_args_text else optimizer_name


def _group_lrs(params: list) -> list[float]:
    return [p["lr"] for p in params if isinstance(p, dict) and p.get("lr") is not None]


def _warn_lr_free(optimizer_type: str, lr: float, params: list) -> None:
    lrs = [lr, *_group_lrs(params)]
    if min(lrs) <= 0.1:
        logger.warning("%s adapts the step size itself and expects a learning rate around 1.0; got %s",
                       optimizer_type, min(lrs))
    if len(set(_group_lrs(params))) > 1:
        logger.warning("%s with several learning rates (%s) does not work well; give them all the same value",
                       optimizer_type, sorted(set(lrs)))


def _prepare_adafactor(args: argparse.Namespace, kwargs: dict, params: list) -> float | None:
    """sd-scripts' Adafactor rules; returns the LR to pass (None with relative_step). Mutates kwargs/params/args."""
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        logger.warning("Adafactor: warmup_init=True needs relative_step; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return args.learning_rate
    logger.info("Adafactor with relative_step: it computes its own learning rate")
    dropped = 0
    for group in params:
        if isinstance(group, dict) and "lr" in group:
            del group["lr"]
            dropped += 1
    if dropped:
        logger.warning("Adafactor with relative_step ignores the per-group learning rates (unet_lr, "
                       "text_encoder_lr, ...)")
    forced = f"adafactor:{args.learning_rate}"
    current = getattr(args, "lr_scheduler", "constant")
    if not str(current).startswith("adafactor"):
        logger.warning("Adafactor with relative_step: --lr_scheduler %s replaced by %s", current, forced)
    if getattr(args, "max_grad_norm", 0.0):
        logger.info("Adafactor clips its updates itself (clip_threshold); --max_grad_norm 0 turns the extra "
                    "gradient clipping off")
    return None


# --- schedule-free optimizers ---------------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer: Any) -> bool:
    """True for schedule-free optimizers (ScheduleFree in the class name): they need train()/eval() switches."""
    inner = unwrap_optimizer(optimizer)
    return "schedulefree" in type(inner).__name__.lower() and hasattr(inner, "eval")


def optimizer_train_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer in training mode (before training steps); a no-op for the others."""
    if is_schedule_free(optimizer):
        unwrap_optimizer(optimizer).train()


def optimizer_eval_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer in evaluation mode (around sampling, saving, validation); a no-op otherwise."""
    if is_schedule_free(optimizer):
        unwrap_optimizer(optimizer).eval()
