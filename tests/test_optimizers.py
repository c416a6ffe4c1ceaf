"""Optimizer and LR-scheduler factories: every optimizer type builds and steps on CPU, sd-scripts' names and
metadata text, option parsing, every scheduler's LR at chosen steps against hand-computed values, and resume."""

import logging
import argparse
import io
import math
import sys

import pytest
import torch

from library.training.lr_schedulers import SCHEDULERS, get_scheduler, resolve_steps, scheduler_name
from library.training.optimizers import (OptimizerError, add_optimizer_arguments, get_optimizer, is_schedule_free,
                                         optimizer_eval_mode, optimizer_metadata_text, optimizer_train_mode,
                                         parse_kv_args, resolve_optimizer_type)


def make_args(*argv: str, max_train_steps: int = 10, gradient_accumulation_steps: int = 1) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args(list(argv))
    args.max_train_steps = max_train_steps
    args.gradient_accumulation_steps = gradient_accumulation_steps
    return args


def model() -> torch.nn.Module:
    # 64x64 = 4096 weights: large enough for bitsandbytes to keep 8-bit state (min_8bit_size 4096)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def train_steps(optimizer, net: torch.nn.Module, steps: int = 2) -> None:
    """A few steps; the weights must move and stay finite."""
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(8, 64)
    for _ in range(steps):
        net(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, imported once for the module (the import takes seconds)."""
    return pytest.importorskip("bitsandbytes")


# --- command line and option parsing ----------------------------------------------------------------------------


def test_argument_defaults():
    a = make_args()
    assert (a.optimizer_type, a.use_8bit_adam, a.use_lion_optimizer) == ("", False, False)
    assert (a.learning_rate, a.max_grad_norm, a.optimizer_args) == (2e-6, 1.0, None)
    assert (a.lr_scheduler_type, a.lr_scheduler_args, a.lr_scheduler) == ("", None, "constant")
    assert (a.lr_warmup_steps, a.lr_decay_steps, a.lr_scheduler_num_cycles, a.lr_scheduler_power) == (0, 0, 1, 1)
    assert (a.fused_backward_pass, a.lr_scheduler_timescale, a.lr_scheduler_min_lr_ratio) == (False, None, None)
    a = make_args("--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)", "--lr_scheduler_args", "T_max=5")
    assert a.optimizer_args == ["weight_decay=0.01", "betas=(0.9,0.99)"] and a.lr_scheduler_args == ["T_max=5"]


@pytest.mark.parametrize("text, value", [("100", 100), ("0", 0), ("0.1", 0.1), ("10%", 0.1), ("5.0", 5),
                                         ("2.5%", 0.025)])
def test_warmup_values(text, value):
    parsed = make_args("--lr_warmup_steps", text, "--lr_decay_steps", text)
    assert parsed.lr_warmup_steps == value and type(parsed.lr_warmup_steps) is type(value)
    assert parsed.lr_decay_steps == value


@pytest.mark.parametrize("text", ["1.5", "-1", "abc", "120%", ""])
def test_bad_warmup_values(text):
    with pytest.raises(SystemExit):
        make_args("--lr_warmup_steps", text)


def test_parse_kv_args():
    parsed = parse_kv_args(["weight_decay=0.01", "betas=(0.9, 0.99)", "relative_step=False", "flag=true",
                            "decouple=True", "name=cosine", "quoted='x'", "n=3", "lst=[1,2]", "none=None",
                            "eps=1e-8", "d_coef = 2", "expr=a=b"], "--optimizer_args")
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "relative_step": False, "flag": True,
                      "decouple": True, "name": "cosine", "quoted": "x", "n": 3, "lst": [1, 2], "none": None,
                      "eps": 1e-8, "d_coef": 2, "expr": "a=b"}
    assert parse_kv_args(None, "x") == {} and parse_kv_args("a=1", "x") == {"a": 1}


@pytest.mark.parametrize("items", [["weight_decay"], ["=1"], ["two words=1"], ["a=1", "a=2"]])
def test_parse_kv_args_errors(items):
    with pytest.raises(OptimizerError, match="--optimizer_args"):
        parse_kv_args(items, "--optimizer_args")


# --- optimizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, cls, text", [
    ([], "torch.optim.adamw.AdamW", ""),
    (["--optimizer_type", "adamw", "--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)"],
     "torch.optim.adamw.AdamW", "weight_decay=0.01,betas=(0.9, 0.99)"),
    (["--optimizer_type", "SGDNesterov"], "torch.optim.sgd.SGD", "momentum=0.9"),
    (["--optimizer_type", "sgdnesterov", "--optimizer_args", "momentum=0.5"], "torch.optim.sgd.SGD",
     "momentum=0.5"),
    (["--optimizer_type", "RAdam"], "torch.optim.radam.RAdam", ""),
    (["--optimizer_type", "adagrad"], "torch.optim.adagrad.Adagrad", ""),
    (["--optimizer_type", "torch.optim.sgd.SGD", "--optimizer_args", "momentum=0.8"], "torch.optim.sgd.SGD",
     "momentum=0.8"),
    (["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False"],
     "transformers.optimization.Adafactor", "relative_step=False,scale_parameter=False"),
])
def test_torch_and_transformers_optimizers(argv, cls, text):
    net = model()
    args = make_args("--learning_rate", "1e-3", *argv)
    name, args_text, optimizer = get_optimizer(args, net.parameters())
    assert (name, args_text) == (cls, text)
    assert optimizer_metadata_text(name, args_text) == (f"{cls}({text})" if text else cls)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    train_steps(optimizer, net)


def test_sgd_nesterov_is_nesterov():
    _, _, optimizer = get_optimizer(make_args("--optimizer_type", "SGDNesterov"), model().parameters())
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer_type, cls, eight_bit", [
    ("AdamW8bit", "AdamW8bit", True), ("PagedAdamW8bit", "PagedAdamW8bit", True),
    ("PagedAdamW", "PagedAdamW", False), ("PagedAdamW32bit", "PagedAdamW32bit", False),
    ("Lion8bit", "Lion8bit", True), ("pagedlion8bit", "PagedLion8bit", True),
    ("SGDNesterov8bit", "SGD8bit", True), ("bitsandbytes.optim.AdEMAMix8bit", "AdEMAMix8bit", True),
])
def test_bitsandbytes_optimizers(bnb, optimizer_type, cls, eight_bit):
    net = model()
    name, _, optimizer = get_optimizer(make_args("--optimizer_type", optimizer_type, "--learning_rate", "1e-3"),
                                       net.parameters())
    assert name.startswith("bitsandbytes.optim.") and name.endswith("." + cls)
    train_steps(optimizer, net)
    state = optimizer.state[net[0].weight]
    assert (state["state1"].dtype == torch.uint8) == eight_bit


def test_legacy_8bit_adam(bnb):
    net = model()
    name, _, optimizer = get_optimizer(make_args("--use_8bit_adam", "--learning_rate", "1e-3"), net.parameters())
    assert name == "bitsandbytes.optim.adamw.AdamW8bit"
    train_steps(optimizer, net)


def test_legacy_flags_and_conflicts():
    assert resolve_optimizer_type(make_args()) == "AdamW"
    assert resolve_optimizer_type(make_args("--use_8bit_adam")) == "AdamW8bit"
    assert resolve_optimizer_type(make_args("--use_lion_optimizer")) == "Lion"
    for argv in (["--use_8bit_adam", "--optimizer_type", "AdamW"], ["--use_lion_optimizer", "--optimizer_type", "Lion"],
                 ["--use_8bit_adam", "--use_lion_optimizer"]):
        with pytest.raises(OptimizerError, match="both given"):
            get_optimizer(make_args(*argv), model().parameters())


@pytest.mark.parametrize("module, optimizer_type, cls, lr", [
    ("lion_pytorch", "Lion", "lion_pytorch.lion_pytorch.Lion", "1e-3"),
    ("lion_pytorch", "--use_lion_optimizer", "lion_pytorch.lion_pytorch.Lion", "1e-3"),
    ("prodigyopt", "Prodigy", "prodigyopt.prodigy.Prodigy", "1"),
    *[("dadaptation", name, None, "1") for name in ("DAdaptation", "DAdaptAdam", "DAdaptLion", "DAdaptSGD",
                                                    "DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP")],
    *[("schedulefree", name, None, "1e-3") for name in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")],
])
def test_optional_package_optimizers(module, optimizer_type, cls, lr):
    pytest.importorskip(module)
    net = model()
    argv = [optimizer_type] if optimizer_type.startswith("--") else ["--optimizer_type", optimizer_type]
    name, _, optimizer = get_optimizer(make_args(*argv, "--learning_rate", lr), net.parameters())
    assert cls is None or name == cls
    assert is_schedule_free(optimizer) == (module == "schedulefree")
    optimizer_train_mode(optimizer)  # schedule-free optimizers step only in training mode
    train_steps(optimizer, net)
    optimizer_eval_mode(optimizer)


def test_lr_free_warnings(caplog):
    pytest.importorskip("prodigyopt")
    net = model()
    _, text, _ = get_optimizer(make_args("--optimizer_type", "prodigy", "--learning_rate", "1.0",
                                         "--optimizer_args", "d_coef=2", "decouple=True"), net.parameters())
    assert text == "d_coef=2,decouple=True"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # INFO lines depend on earlier tests
    # Prodigy itself refuses to step with different group LRs; sd-scripts (and we) warn when building it
    groups = [{"params": list(net[0].parameters()), "lr": 1.0}, {"params": list(net[2].parameters()), "lr": 0.5}]
    get_optimizer(make_args("--optimizer_type", "Prodigy", "--learning_rate", "1.0"), groups)
    assert "several learning rates" in caplog.text
    get_optimizer(make_args("--optimizer_type", "Prodigy"), model().parameters())
    assert "around 1.0" in caplog.text


@pytest.mark.parametrize("optimizer_type, module, package", [
    ("Lion", "lion_pytorch", "lion-pytorch"), ("Prodigy", "prodigyopt", "prodigyopt"),
    ("DAdaptAdam", "dadaptation", "dadaptation"), ("DAdaptation", "dadaptation.experimental", "dadaptation"),
    ("AdamWScheduleFree", "schedulefree", "schedulefree"), ("AdamW8bit", "bitsandbytes.optim", "bitsandbytes"),
    ("no_such_package_xyz.Optimizer", "no_such_package_xyz", "no_such_package_xyz"),
])
def test_missing_package_names_pip_package(monkeypatch, optimizer_type, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if not installed
    with pytest.raises(OptimizerError, match=f"pip install {package}"):
        get_optimizer(make_args("--optimizer_type", optimizer_type), model().parameters())


def test_optimizer_errors():
    with pytest.raises(OptimizerError, match="unknown --optimizer_type 'NoSuchOpt'"):
        get_optimizer(make_args("--optimizer_type", "NoSuchOpt"), model().parameters())
    with pytest.raises(OptimizerError, match="--learning_rate"):
        get_optimizer(make_args("--optimizer_args", "lr=1e-3"), model().parameters())
    with pytest.raises(OptimizerError, match="rejects the arguments"):
        get_optimizer(make_args("--optimizer_args", "no_such_arg=1"), model().parameters())
    with pytest.raises(OptimizerError, match="torch.optim has no 'Nope'"):
        get_optimizer(make_args("--optimizer_type", "torch.optim.Nope"), model().parameters())
    with pytest.raises(OptimizerError, match="only with --optimizer_type Adafactor"):
        get_optimizer(make_args("--fused_backward_pass"), model().parameters())
    with pytest.raises(OptimizerError, match="gradient_accumulation_steps 1"):
        get_optimizer(make_args("--fused_backward_pass", "--optimizer_type", "adafactor",
                                gradient_accumulation_steps=2), model().parameters())


def test_adafactor_relative_step_forces_its_scheduler():
    net = model()
    groups = [{"params": list(net[0].parameters()), "lr": 1e-4}, {"params": list(net[2].parameters()), "lr": 1e-5}]
    args = make_args("--optimizer_type", "Adafactor", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
                     "--fused_backward_pass")
    name, text, optimizer = get_optimizer(args, groups)
    assert (name, text) == ("transformers.optimization.Adafactor", "relative_step=True")
    assert optimizer.defaults["lr"] is None and all(g["lr"] is None for g in optimizer.param_groups)
    assert scheduler_name(args, optimizer) == "adafactor:0.001"
    scheduler = get_scheduler(args, optimizer, 1)
    assert type(scheduler).__name__ == "AdafactorSchedule" and scheduler.get_last_lr() == [1e-3, 1e-3]
    train_steps(optimizer, net)
    scheduler.step()
    assert all(0 < lr < 1e-1 for lr in scheduler.get_last_lr())  # Adafactor's own relative-step LR
    with pytest.raises(OptimizerError, match="does not require num_warmup_steps"):
        get_scheduler(make_args("--optimizer_type", "Adafactor", "--lr_scheduler", "adafactor:1e-3",
                                "--lr_warmup_steps", "5"), optimizer)
    with pytest.raises(OptimizerError, match="needs --optimizer_type Adafactor"):
        get_scheduler(make_args("--lr_scheduler", "adafactor"), torch.optim.SGD(model().parameters(), lr=1.0))


def test_adafactor_warmup_init_forces_relative_step():
    args = make_args("--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True")
    _, text, optimizer = get_optimizer(args, model().parameters())
    assert text == "relative_step=True,warmup_init=True" and scheduler_name(args, optimizer).startswith("adafactor:")


# --- schedulers ---------------------------------------------------------------------------------------------------


def sched_lrs(*argv: str, steps: int = 10, ticks: int = 13, processes: int = 1, lrs=(1.0,)) -> list[float]:
    """LR of the first group at ticks 0..ticks-1 (base LR 1.0, so the LR is the schedule's multiplier)."""
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])
    scheduler = get_scheduler(make_args(*argv, max_train_steps=steps), optimizer, processes)
    optimizer.step()  # no gradients: nothing changes, but torch sees a step before the scheduler's
    out = []
    for _ in range(ticks):
        out.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return out


def check(actual: list[float], expected: dict[int, float]) -> None:
    for tick, value in expected.items():
        assert actual[tick] == pytest.approx(value, abs=1e-12), (tick, actual[tick], value)


def cos_half(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_constant_and_constant_with_warmup():
    assert sched_lrs() == [1.0] * 13
    check(sched_lrs("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"),
          {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 12: 1.0})


@pytest.mark.parametrize("warmup", ["2", "0.2", "20%"])
def test_linear_with_warmup_forms(warmup):
    check(sched_lrs("--lr_scheduler", "linear", "--lr_warmup_steps", warmup),
          {0: 0.0, 1: 0.5, 2: 1.0, 3: 7 / 8, 6: 0.5, 10: 0.0, 12: 0.0})


def test_cosine_family():
    check(sched_lrs("--lr_scheduler", "cosine"), {0: 1.0, 2: cos_half(0.2), 5: 0.5, 10: 0.0})
    check(sched_lrs("--lr_scheduler", "cosine", "--lr_scheduler_args", "num_cycles=1"), {5: 0.0, 10: 1.0})
    check(sched_lrs("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"),
          {0: 1.0, 2: cos_half(0.4), 4: cos_half(0.8), 5: 1.0, 7: cos_half(0.4), 10: 0.0, 11: 0.0})
    check(sched_lrs("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
                    "--lr_warmup_steps", "2"),
          {1: 0.5, 2: 1.0, 6: 0.55, 10: 0.1})


def test_polynomial():
    end = 1e-7
    check(sched_lrs("--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"),
          {0: 1.0, 5: (1 - end) * 0.25 + end, 10: end, 12: end})
    # per parameter group: each ends at lr_end
    assert sched_lrs("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.1", lrs=(1.0,))[10] == \
        pytest.approx(0.1)
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.5)])
    scheduler = get_scheduler(make_args("--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.1"),
                              optimizer, 1)
    optimizer.step()
    for _ in range(5):
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.9 * 0.5 + 0.1, 0.4 * 0.5 + 0.1])
    for _ in range(5):
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.1, 0.1])


def test_inverse_sqrt():
    check(sched_lrs("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4"),
          {2: 0.5, 4: 1.0, 12: 1 / math.sqrt(3)})
    check(sched_lrs("--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "4", ticks=50), {12: 0.5, 0: 1.0})
    check(sched_lrs("--lr_scheduler", "inverse_sqrt", ticks=3), {2: 1 / math.sqrt(10_002 / 10_000)})


def test_warmup_stable_decay():
    base = ("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "0.4",
            "--lr_scheduler_min_lr_ratio", "0.1")
    check(sched_lrs(*base), {0: 0.1, 1: 0.55, 2: 1.0, 5: 1.0, 6: 1.0, 7: 0.9 * cos_half(0.25) + 0.1, 8: 0.55,
                             10: 0.1, 12: 0.1})
    check(sched_lrs(*base, "--lr_scheduler_args", "decay_type='linear'", "warmup_type=cosine"),
          {1: 0.55, 7: 0.9 * 0.75 + 0.1})
    check(sched_lrs("--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "4"), {6: 1.0, 8: 0.5, 10: 0.0})
    with pytest.raises(OptimizerError, match="exceed"):
        sched_lrs("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "6", "--lr_decay_steps", "5")


def test_piecewise_constant():
    rules = ("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:3,0.1:6,0.01")
    assert sched_lrs(*rules, ticks=8) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert sched_lrs(*rules, ticks=14, processes=2)[5:8] == pytest.approx([1, 0.1, 0.1])
    with pytest.raises(OptimizerError, match="step_rules"):
        sched_lrs("--lr_scheduler", "piecewise_constant")
    with pytest.raises(OptimizerError, match="step_rules"):
        sched_lrs("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:x,0.1")


def test_processes_multiply_every_step_count():
    # 10 optimizer steps on 2 processes: 20 scheduler ticks; the 2-step warm-up is 4 ticks in every form
    for warmup in ("2", "0.2", "20%"):
        check(sched_lrs("--lr_scheduler", "linear", "--lr_warmup_steps", warmup, processes=2, ticks=21),
              {2: 0.5, 4: 1.0, 12: 0.5, 20: 0.0})
    assert resolve_steps(0.15, 20, 2, "w") == 3 and resolve_steps(3, 20, 2, "w") == 6
    assert resolve_steps("10%", 20, 2, "w") == 2 and resolve_steps(4.0, 20, 2, "w") == 8
    with pytest.raises(OptimizerError):
        resolve_steps(1.5, 20, 2, "w")


def test_custom_scheduler_types():
    assert sched_lrs("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5",
                     ticks=5) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    assert sched_lrs("--lr_scheduler_type", "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler_args",
                     "gamma=0.5", ticks=3) == pytest.approx([1, 0.5, 0.25])
    with pytest.raises(OptimizerError, match="does not require num_warmup_steps"):
        sched_lrs("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_warmup_steps", "1")
    with pytest.raises(OptimizerError, match="not a torch.optim.lr_scheduler class"):
        sched_lrs("--lr_scheduler_type", "NoSuchLR")
    with pytest.raises(OptimizerError, match="rejects the arguments"):
        sched_lrs("--lr_scheduler_type", "StepLR")


@pytest.mark.parametrize("argv, match", [
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "1"], "does not require num_warmup_steps"),
    (["--lr_scheduler", "cosine_annealing"], "unknown --lr_scheduler"),
    (["--lr_scheduler", "cosine_with_min_lr"], "needs exactly one"),
    (["--lr_scheduler", "linear", "--lr_scheduler_args", "power=2"], "power is not an argument of linear"),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=2.0"], "must not exceed"),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_scheduler_args", "decay_type=exp"], "decay_type"),
])
def test_scheduler_errors(argv, match):
    with pytest.raises(OptimizerError, match=match):
        sched_lrs(*argv)


class FakeScheduleFree(torch.optim.SGD):
    """Stands in for a schedulefree optimizer (the class name is what identifies them)."""

    mode = "train"

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


def test_schedule_free_gets_a_constant_scheduler():
    optimizer = FakeScheduleFree(model().parameters(), lr=0.3)
    scheduler = get_scheduler(make_args("--lr_scheduler", "cosine", "--lr_warmup_steps", "3"), optimizer, 1)
    optimizer.step()
    for _ in range(5):
        scheduler.step()
    assert scheduler.get_last_lr() == [0.3]
    assert is_schedule_free(optimizer) and not is_schedule_free(torch.optim.SGD(model().parameters(), lr=1.0))
    optimizer_eval_mode(optimizer)
    assert optimizer.mode == "eval"
    optimizer_train_mode(optimizer)
    assert optimizer.mode == "train"


ROUND_TRIP = [
    ["--lr_scheduler", "constant"],
    ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"],
    ["--lr_scheduler", "linear", "--lr_warmup_steps", "0.2"],
    ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2"],
    ["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "3"],
    ["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"],
    ["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2"],
    ["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.2"],
    ["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "30%"],
    ["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:4,0.5:8,0.1"],
    ["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3"],
]


def test_round_trip_covers_every_scheduler():
    covered = {argv[1] for argv in ROUND_TRIP if argv[0] == "--lr_scheduler"}
    assert covered == set(SCHEDULERS) - {"adafactor"}


@pytest.mark.parametrize("argv", ROUND_TRIP, ids=lambda argv: argv[1])
def test_state_dict_round_trip(argv):
    def build():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5, momentum=0.9)
        return optimizer, get_scheduler(make_args(*argv, max_train_steps=20), optimizer, 2)

    optimizer, scheduler = build()
    optimizer.step()
    for _ in range(3):
        scheduler.step()
    at_save = scheduler.get_last_lr()
    saved = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, saved)
    expected = []
    for _ in range(40):
        scheduler.step()
        expected.append(scheduler.get_last_lr()[0])

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed_optimizer, resumed = build()
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert resumed.get_last_lr() == at_save and resumed_optimizer.param_groups[0]["lr"] == at_save[0]
    resumed_optimizer.step()
    actual = []
    for _ in range(40):
        resumed.step()
        actual.append(resumed.get_last_lr()[0])
    assert actual == expected
    assert len(set(expected)) > 1 or argv[1] == "constant"


TRANSFORMERS_EQUIVALENTS = [
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "3"], "linear", {}),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "3"], "cosine", {}),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"], "constant_with_warmup", {}),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "3", "--lr_warmup_steps", "2"],
     "cosine_with_restarts", {"num_cycles": 3}),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "1.5", "--lr_warmup_steps", "2"], "polynomial",
     {"power": 1.5}),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "3"], "inverse_sqrt", {}),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1", "--lr_scheduler_num_cycles", "2",
      "--lr_warmup_steps", "2"], "cosine_with_min_lr", {"num_cycles": 1.0, "min_lr_rate": 0.1}),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "6",
      "--lr_scheduler_min_lr_ratio", "0.05"], "warmup_stable_decay",
     {"num_decay_steps": 6, "min_lr_ratio": 0.05, "num_cycles": 0.5}),
]


@pytest.mark.parametrize("argv, name, kwargs", TRANSFORMERS_EQUIVALENTS, ids=lambda v: v if isinstance(v, str) else "")
def test_same_shapes_as_transformers(argv, name, kwargs):
    """sd-scripts calls transformers' schedules (one process); ours give the same LR at every step."""
    from transformers.optimization import get_scheduler as hf_get_scheduler

    ours = sched_lrs(*argv, steps=20, ticks=23, lrs=(0.7,))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.7)
    scheduler = hf_get_scheduler(name, optimizer, num_warmup_steps=int(argv[argv.index("--lr_warmup_steps") + 1]),
                                 num_training_steps=20, scheduler_specific_kwargs=kwargs)
    optimizer.step()
    theirs = []
    for _ in range(23):
        theirs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
