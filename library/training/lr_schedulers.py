"""Learning-rate schedulers (reference 15.2): sd-scripts' names and options, as `torch.optim.lr_scheduler` objects.

The schedule shapes are the ones transformers defines for the same names (sd-scripts calls transformers), written
here as small pure functions of the step so they read on their own and do not change with the transformers version.
Every built-in scheduler is a `LambdaLR` over a `functools.partial`: its `state_dict()` holds only the position
(`last_epoch`, ...), so a resumed run continues the schedule its current options describe.

Counting. accelerate's prepared scheduler advances `num_processes` times per optimizer step, so schedules run over
`max_train_steps * num_processes` ticks, as in sd-scripts. A fraction (`0.1`, `"10%"`) of warm-up or decay is a
fraction of those ticks, as in sd-scripts. Step counts the user gives (whole `--lr_warmup_steps`, `--lr_decay_steps`,
`--lr_scheduler_timescale`, `step_rules` boundaries, `num_stable_steps`) are OPTIMIZER steps and are multiplied by
`num_processes` too; sd-scripts does not multiply them, so with N processes its warm-up ends after 1/N of the
requested steps. Pass `num_processes=1` when stepping a bare scheduler once per optimizer step.

Other differences from sd-scripts: `polynomial` and `cosine_with_min_lr`'s `min_lr` are computed per parameter group
(transformers uses the optimizer's default LR for every group, so a group with its own LR did not end at `lr_end`);
`piecewise_constant` with a warm-up is an error (sd-scripts ignores the warm-up); `--lr_scheduler_args` may override
the values derived from the dedicated options (sd-scripts fails with a duplicate keyword).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from functools import partial
from typing import Any, Callable

from library.training.optimizers import (OptimizerError, import_class, is_schedule_free, parse_kv_args,
                                         steps_or_fraction, unwrap_optimizer)

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")
_NO_WARMUP = ("constant", "piecewise_constant", "adafactor")
_SHAPES = ("linear", "cosine", "1-sqrt")


# --- schedule shapes: multiplier of the base LR at scheduler tick `step` ----------------------------------------


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float, min_lr_rate: float = 0.0) -> float:
    """Cosine from 1 down to min_lr_rate over `num_cycles` periods (0.5: one half wave)."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
    return max(0.0, factor * (1.0 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int) -> float:
    """`num_cycles` half-cosine decays from 1 to 0, each restarting at 1 (hard restarts)."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, base_lr: float, lr_end: float, power: float) -> float:
    """(base_lr - lr_end) * remaining**power + lr_end, as a multiplier of base_lr."""
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / base_lr
    remaining = 1.0 - (step - warmup) / max(1, total - warmup)
    return ((base_lr - lr_end) * remaining ** power + lr_end) / base_lr


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _shape(kind: str, progress: float, rising: bool) -> float:
    """Warm-up (rising) or decay curve of warmup_stable_decay at progress in [0, 1]."""
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0 - math.sqrt(1.0 - progress) if rising else 1.0 - math.sqrt(progress)  # "1-sqrt"


def _warmup_stable_decay(step: int, *, warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str,
                         min_lr_ratio: float, num_cycles: float) -> float:
    """Rise from min_lr_ratio to 1, hold, decay back to min_lr_ratio, then stay there."""
    if step < warmup:
        factor = _shape(warmup_type, step / max(1, warmup), rising=True)
    elif step < warmup + stable:
        return 1.0
    elif step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        if decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
        else:
            factor = _shape(decay_type, progress, rising=False)
    else:
        return min_lr_ratio
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def _piecewise_constant(step: int, *, boundaries: tuple, multipliers: tuple, last: float) -> float:
    """multipliers[i] while step < boundaries[i] (ascending), `last` after the last boundary."""
    for boundary, multiplier in zip(boundaries, multipliers):
        if step < boundary:
            return multiplier
    return last


# --- step counts -----------------------------------------------------------------------------------------------


def resolve_steps(value: Any, total_ticks: int, num_processes: int, what: str) -> int:
    """Scheduler ticks of a warm-up/decay option: whole steps x num_processes, or int(fraction x total_ticks)."""
    if value is None or value == 0:
        return 0
    if isinstance(value, str) or isinstance(value, float) and value >= 1:
        try:
            value = steps_or_fraction(str(value))
        except argparse.ArgumentTypeError as e:
            raise OptimizerError(f"{what}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise OptimizerError(f"{what}: {value!r} is not a step count, a fraction below 1 or a percentage")
    if isinstance(value, float):
        return int(value * total_ticks)
    return value * num_processes


# --- the factory ------------------------------------------------------------------------------------------------


def scheduler_name(args: argparse.Namespace, optimizer: Any) -> str:
    """--lr_scheduler, except for an Adafactor that computes its own learning rate (relative_step): that one needs
    its own schedule, `adafactor:<--learning_rate>` (reference 15.1; sd-scripts writes it back into args)."""
    inner = unwrap_optimizer(optimizer)
    if type(inner).__name__ == "Adafactor" and getattr(inner, "defaults", {}).get("relative_step"):
        return f"adafactor:{args.learning_rate}"
    return str(getattr(args, "lr_scheduler", None) or "constant")


def get_scheduler(args: argparse.Namespace, optimizer: Any, num_processes: int = 1,
                  max_train_steps: int | None = None) -> Any:
    """The LR scheduler of --lr_scheduler / --lr_scheduler_type for `optimizer` (reference 15.2).

    Uses `max_train_steps` (the run's resolved count; default args.max_train_steps), lr_warmup_steps,
    lr_decay_steps, lr_scheduler_num_cycles, lr_scheduler_power,
    lr_scheduler_timescale, lr_scheduler_min_lr_ratio, lr_scheduler_args and learning_rate (adafactor).
    `num_processes`: how often the scheduler advances per optimizer step (accelerate's prepared scheduler: the
    number of processes). Returns a `torch.optim.lr_scheduler.LRScheduler`.
    """
    from torch.optim.lr_scheduler import LambdaLR

    name = scheduler_name(args, optimizer).strip().lower()
    custom = (getattr(args, "lr_scheduler_type", None) or "").strip()
    kwargs = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")
    max_train_steps = max_train_steps or getattr(args, "max_train_steps", None)
    if not max_train_steps:
        raise OptimizerError("the LR scheduler needs max_train_steps (resolve --max_train_epochs first)")
    num_processes = max(1, int(num_processes))
    total = int(max_train_steps) * num_processes
    warmup = resolve_steps(getattr(args, "lr_warmup_steps", 0), total, num_processes, "--lr_warmup_steps")
    decay = resolve_steps(getattr(args, "lr_decay_steps", 0), total, num_processes, "--lr_decay_steps")
    if warmup > total:
        logger.warning("the warm-up (%d) is longer than the training (%d scheduler steps)", warmup, total)

    if is_schedule_free(optimizer):
        if custom or name != "constant" or warmup:
            logger.warning("schedule-free optimizer: --lr_scheduler, --lr_scheduler_type and --lr_warmup_steps are "
                           "ignored (use the optimizer's own warmup_steps argument)")
        return LambdaLR(optimizer, _constant)

    if custom:
        _reject_warmup(f"--lr_scheduler_type {custom}", warmup)
        cls = import_class(custom, "--lr_scheduler_type") if "." in custom else _torch_scheduler_class(custom)
        logger.info("LR scheduler %s.%s with %s", cls.__module__, cls.__name__, kwargs)
        try:
            return cls(optimizer, **kwargs)
        except TypeError as e:
            raise OptimizerError(f"--lr_scheduler_type {custom} rejects the arguments {kwargs} ({e})") from e

    base = name.split(":", 1)[0]
    if base not in SCHEDULERS:
        raise OptimizerError(f"unknown --lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} "
                             "(or give a class with --lr_scheduler_type)")
    if base in _NO_WARMUP:
        _reject_warmup(base, warmup)
    if decay and base != "warmup_stable_decay":
        logger.warning("--lr_decay_steps is used only by warmup_stable_decay; ignored by %s", base)
    if base == "adafactor":
        return _adafactor_schedule(name, args, optimizer, kwargs)

    opts = _scheduler_options(base, args, kwargs)
    ctx = dict(warmup=warmup, total=total, decay=decay, num_processes=num_processes)
    lambdas = _BUILDERS[base](optimizer, opts, **ctx)
    logger.info("LR scheduler %s: %d scheduler steps, warm-up %d, options %s", base, total, warmup, opts)
    return LambdaLR(optimizer, lambdas)


def _reject_warmup(what: str, warmup: int) -> None:
    if warmup:
        raise OptimizerError(f"{what} does not require num_warmup_steps: set --lr_warmup_steps 0 "
                             "(or choose a scheduler with a warm-up)")


def _torch_scheduler_class(name: str) -> type:
    module = importlib.import_module("torch.optim.lr_scheduler")
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise OptimizerError(f"--lr_scheduler_type {name!r} is not a torch.optim.lr_scheduler class; give a "
                             "module.Class path for other schedulers")
    return cls


def _adafactor_schedule(name: str, args: argparse.Namespace, optimizer: Any, kwargs: dict) -> Any:
    """transformers' AdafactorSchedule, reporting Adafactor's own LRs; `adafactor:<lr>` gives the initial LR."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner).__name__ != "Adafactor":
        raise OptimizerError(f"--lr_scheduler adafactor needs --optimizer_type Adafactor, not {type(inner).__name__}")
    if kwargs:
        raise OptimizerError(f"--lr_scheduler_args: the adafactor scheduler takes no arguments ({kwargs})")
    _, _, lr_text = name.partition(":")
    try:
        initial_lr = float(lr_text) if lr_text else float(args.learning_rate)
    except ValueError:
        raise OptimizerError(f"--lr_scheduler {name}: expected adafactor:<initial learning rate>") from None
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(inner, initial_lr)


def _scheduler_options(base: str, args: argparse.Namespace, kwargs: dict) -> dict:
    """Defaults from the dedicated options, overridden by --lr_scheduler_args; unknown keys are errors."""
    cycles = getattr(args, "lr_scheduler_num_cycles", 1)
    ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    defaults: dict[str, dict] = {
        "constant": {}, "constant_with_warmup": {}, "linear": {},
        "cosine": {"num_cycles": 0.5},
        "cosine_with_restarts": {"num_cycles": cycles},
        "polynomial": {"power": getattr(args, "lr_scheduler_power", 1.0), "lr_end": 1e-7},
        "inverse_sqrt": {"timescale": getattr(args, "lr_scheduler_timescale", None)},
        "cosine_with_min_lr": {"num_cycles": cycles / 2, "min_lr_rate": ratio, "min_lr": None},
        "warmup_stable_decay": {"num_cycles": cycles / 2, "min_lr_ratio": ratio if ratio is not None else 0.0,
                                "warmup_type": "linear", "decay_type": "cosine", "num_stable_steps": None},
        "piecewise_constant": {"step_rules": None},
    }
    opts = dict(defaults[base])
    for key, value in kwargs.items():
        if key not in opts:
            accepted = ", ".join(opts) or "none"
            raise OptimizerError(f"--lr_scheduler_args: {key} is not an argument of {base} (accepted: {accepted})")
        opts[key] = value
    return opts


def _group_base_lrs(optimizer: Any) -> list[float]:
    return [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]


def _build_simple(fn: Callable, *keys: str) -> Callable:
    def build(optimizer, opts, *, warmup, total, decay, num_processes):
        context = {"warmup": warmup, "total": total}
        return partial(fn, **{k: context[k] for k in keys}, **opts)
    return build


def _build_polynomial(optimizer, opts, *, warmup, total, decay, num_processes):
    lambdas = []
    for base_lr in _group_base_lrs(optimizer):
        if opts["lr_end"] > base_lr:
            raise OptimizerError(f"polynomial: lr_end ({opts['lr_end']}) must not exceed the learning rate "
                                 f"({base_lr}); set it with --lr_scheduler_args lr_end=...")
        lambdas.append(partial(_polynomial, warmup=warmup, total=total, base_lr=base_lr, lr_end=opts["lr_end"],
                               power=float(opts["power"])))
    return lambdas


def _build_inverse_sqrt(optimizer, opts, *, warmup, total, decay, num_processes):
    timescale = opts["timescale"]
    timescale = int(timescale) * num_processes if timescale is not None else (warmup or 10_000 * num_processes)
    if timescale <= 0:
        raise OptimizerError("inverse_sqrt: --lr_scheduler_timescale must be positive")
    return partial(_inverse_sqrt, warmup=warmup, timescale=timescale)


def _build_cosine_with_min_lr(optimizer, opts, *, warmup, total, decay, num_processes):
    rate, min_lr = opts["min_lr_rate"], opts["min_lr"]
    if (rate is None) == (min_lr is None):
        raise OptimizerError("cosine_with_min_lr needs exactly one of --lr_scheduler_min_lr_ratio (or "
                             "--lr_scheduler_args min_lr_rate=...) and --lr_scheduler_args min_lr=...")
    rates = [rate] * len(optimizer.param_groups) if rate is not None \
        else [min_lr / lr for lr in _group_base_lrs(optimizer)]
    return [partial(_cosine, warmup=warmup, total=total, num_cycles=float(opts["num_cycles"]), min_lr_rate=r)
            for r in rates]


def _build_wsd(optimizer, opts, *, warmup, total, decay, num_processes):
    for key in ("warmup_type", "decay_type"):
        if opts[key] not in _SHAPES:
            raise OptimizerError(f"warmup_stable_decay: {key} {opts[key]!r} is not one of {', '.join(_SHAPES)}")
    stable = opts["num_stable_steps"]
    stable = int(stable) * num_processes if stable is not None else total - warmup - decay
    if stable < 0:
        raise OptimizerError(f"warmup_stable_decay: warm-up ({warmup}) plus decay ({decay}) exceed the "
                             f"{total} scheduler steps")
    return partial(_warmup_stable_decay, warmup=warmup, stable=stable, decay=decay,
                   warmup_type=opts["warmup_type"], decay_type=opts["decay_type"],
                   min_lr_ratio=float(opts["min_lr_ratio"]), num_cycles=float(opts["num_cycles"]))


def _build_piecewise(optimizer, opts, *, warmup, total, decay, num_processes):
    """step_rules "m1:s1,m2:s2,...,m_last": multiplier m_i before optimizer step s_i (ascending), then m_last."""
    text = opts["step_rules"]
    if text is None:
        raise OptimizerError('piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01"')
    rules = str(text).replace(" ", "").split(",")
    pairs = []
    try:
        for rule in rules[:-1]:
            multiplier, steps = rule.split(":")
            pairs.append((int(steps) * num_processes, float(multiplier)))
        last = float(rules[-1])
    except ValueError:
        raise OptimizerError(f"piecewise_constant: step_rules {text!r} is not "
                             "\"multiplier:step,...,last multiplier\"") from None
    pairs.sort()
    return partial(_piecewise_constant, boundaries=tuple(p[0] for p in pairs),
                   multipliers=tuple(p[1] for p in pairs), last=last)


_BUILDERS = {
    "constant": lambda optimizer, opts, **ctx: _constant,
    "constant_with_warmup": _build_simple(_constant_with_warmup, "warmup"),
    "linear": _build_simple(_linear, "warmup", "total"),
    "cosine": _build_simple(_cosine, "warmup", "total"),
    "cosine_with_restarts": _build_simple(_cosine_with_restarts, "warmup", "total"),
    "polynomial": _build_polynomial,
    "inverse_sqrt": _build_inverse_sqrt,
    "cosine_with_min_lr": _build_cosine_with_min_lr,
    "warmup_stable_decay": _build_wsd,
    "piecewise_constant": _build_piecewise,
}
