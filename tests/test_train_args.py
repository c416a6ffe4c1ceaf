"""sd-scripts' training command line: parsing, --config_file, ineffective options, checks and implications."""

import argparse
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from library.training import config_file
from library.training import arguments as ta
from library.training.recipes import command_lines

try:
    from library.training.optimizers import add_optimizer_arguments
except ImportError:  # written concurrently by another engineer: a stand-in with sd-scripts' names (reference 1.9)
    def add_optimizer_arguments(parser):
        group = parser.add_argument_group("optimizer")

        def add(*a, **kw):
            group.add_argument(*a, help="stand-in", **kw)

        add("--optimizer_type", type=str, default="")
        add("--learning_rate", type=float, default=2e-6)
        add("--max_grad_norm", type=float, default=1.0)
        add("--optimizer_args", type=str, default=None, nargs="*")
        add("--lr_scheduler", type=str, default="constant")
        add("--lr_warmup_steps", type=lambda v: float(v) if "." in v else int(v), default=0)
        add("--fused_backward_pass", action="store_true")


# A FLUX LoRA command line as sd-scripts' docs write it.
LORA_CLI = (
    "--pretrained_model_name_or_path flux1-dev.safetensors --clip_l sd3/clip_l.safetensors "
    "--t5xxl sd3/t5xxl_fp16.safetensors --ae ae.safetensors --cache_latents_to_disk --save_model_as safetensors "
    "--sdpa --persistent_data_loader_workers --max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing "
    "--mixed_precision bf16 --save_precision bf16 --network_module networks.lora_flux --network_dim 4 "
    "--network_train_unet_only --optimizer_type adamw8bit --learning_rate 1e-4 --cache_text_encoder_outputs "
    "--cache_text_encoder_outputs_to_disk --fp8_base --highvram --max_train_epochs 4 --save_every_n_epochs 1 "
    "--dataset_config dataset_1024_bs2.toml --output_dir out --output_name flux-lora-name --timestep_sampling shift "
    "--discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0 --text_encoder_lr 1e-5 5e-5 "
    "--network_args train_blocks=single loraplus_lr_ratio=4 --blocks_to_swap 18 --lr_scheduler constant_with_warmup "
    "--max_grad_norm 0.0 --apply_t5_attn_mask --loss_type l2 --sample_prompts prompts.txt --sample_every_n_steps 100"
).split()


TRAINERS = {"network": command_lines.LORA, "full": command_lines.FULL, "controlnet": command_lines.CONTROLNET}


def parser(trainer="network"):
    return ta.training_parser(TRAINERS[trainer], add_optimizer_arguments=add_optimizer_arguments)


def parse(argv, trainer="network"):
    return parser(trainer).parse_args(argv)


# --- parsing ------------------------------------------------------------------------------------------------------


def test_sd_scripts_lora_command_line_parses():
    args = parse(LORA_CLI)
    assert args.pretrained_model_name_or_path == "flux1-dev.safetensors"
    assert args.network_dim == 4 and isinstance(args.network_dim, int)
    assert args.text_encoder_lr == [1e-5, 5e-5]
    assert args.network_args == ["train_blocks=single", "loraplus_lr_ratio=4"]
    assert args.discrete_flow_shift == 3.1582 and args.guidance_scale == 1.0
    assert args.blocks_to_swap == 18 and args.seed == 42 and args.max_train_epochs == 4
    assert args.dataset_config == "dataset_1024_bs2.toml"


def test_defaults_that_define_behaviour():
    args = parse([])
    assert (args.timestep_sampling, args.discrete_flow_shift, args.model_prediction_type) == ("sigma", 3.0,
                                                                                           "sigma_scaled")
    assert (args.guidance_scale, args.weighting_scheme, args.sigmoid_scale) == (None, "uniform", 1.0)  # the model's
    assert (args.logit_mean, args.logit_std, args.mode_scale) == (0.0, 1.0, 1.29)
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert (args.max_train_steps, args.mixed_precision, args.save_model_as) == (1600, "no", "safetensors")
    assert args.network_alpha == 1.0 and isinstance(args.network_alpha, float)  # not the int 1 (reference 17.25)
    assert args.t5xxl_max_token_length is None and args.model_type == "flux"
    assert (args.zero_stage, args.dynamo_backend, args.sample_sampler) == (2, "inductor", "ddim")
    assert (args.multires_noise_discount, args.max_data_loader_n_workers) == (0.3, 8)


def test_every_option_has_help_and_trainers_compose():
    for trainer in TRAINERS:
        p = parser(trainer)
        missing = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert not missing, f"{trainer}: no help for {missing}"
        assert "--pretrained_model_name_or_path" in p.format_help()  # help strings format (no stray %)
    full, cn = parse([], "full"), parse([], "controlnet")
    assert full.save_model_as is None and not hasattr(full, "network_dim") and hasattr(full, "mem_eff_save")
    assert not hasattr(cn, "reg_data_dir") and hasattr(cn, "cpu_offload_checkpointing")


def test_chroma_is_trained_by_lora_and_full_and_refused_by_controlnet():
    from library.training.arguments import TrainingArgumentError, verify_training_args
    from library.training.recipes.command_lines import CONTROLNET, FULL, LORA

    for trainer, command_line in (("network", LORA), ("full", FULL)):
        args = parse(["--model_type", "chroma"], trainer)
        assert args.model_type == "chroma"
        try:  # other options are missing here; --model_type is not among the problems
            verify_training_args(args, command_line)
        except TrainingArgumentError as e:
            assert "--model_type" not in str(e)
    with pytest.raises(TrainingArgumentError, match="--model_type chroma is not supported by "
                                                    "flux_train_control_net.py: it trains flux, dev, krea, schnell"):
        verify_training_args(parse(["--model_type", "chroma"], "controlnet"), CONTROLNET)


def test_module_import_is_cheap():
    code = ("import sys; sys.path.insert(0, '.'); import library.training.arguments as t, library.formats.metadata; "
            "from library.training.recipes.command_lines import LORA; t.training_parser(LORA); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL', 'cv2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_parse_network_args():
    assert ta.parse_network_args(["a=1", "regex=x=2", "empty="]) == {"a": "1", "regex": "x=2", "empty": ""}
    with pytest.raises(ta.TrainingArgumentError, match="'train_t5xxl' is not key=value"):
        ta.parse_network_args(["train_t5xxl"])


# --- --config_file ------------------------------------------------------------------------------------------------


def read_config(argv, trainer="network"):
    p = parser(trainer)
    return config_file.read_config_from_file(p.parse_args(argv), p, argv)


def test_config_file_precedence_and_flattening(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('output_name = "top"\n[model]\npretrained_model_name_or_path = "flux1-dev.safetensors"\n'
                   '[training]\nlearning_rate = 1e-3\nnetwork_dim = 8\nmax_train_steps = 10\nxformers = true\n'
                   'network_args = ["train_blocks=single"]\n')
    args = read_config(["--config_file", str(tmp_path / "cfg"), "--network_dim", "16"])
    assert args.network_dim == 16  # command line wins
    assert args.learning_rate == 1e-3 and args.max_train_steps == 10 and args.xformers is True  # file
    assert args.output_name == "top" and args.pretrained_model_name_or_path == "flux1-dev.safetensors"
    assert args.network_args == ["train_blocks=single"] and args.guidance_scale is None  # default
    assert args.config_file == str(tmp_path / "cfg")  # stored without extension, as sd-scripts


def test_config_values_get_the_option_types(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('network_alpha = 16\ntext_encoder_lr = 1e-4\nresolution = 1024\nbase_weights = "a.safetensors"\n'
                   'lr_warmup_steps = 0.1\nnetwork_dim = 32.0\n')
    args = read_config(["--config_file", str(cfg)])
    assert args.network_alpha == 16.0 and isinstance(args.network_alpha, float)
    assert args.text_encoder_lr == [1e-4] and args.resolution == "1024" and args.base_weights == ["a.safetensors"]
    assert args.network_dim == 32 and isinstance(args.network_dim, int)
    assert args.lr_warmup_steps == 0.1


def test_config_file_problems_are_listed_with_suggestions(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[train]\nlearing_rate = 1e-4\nxformers = "yes"\nmixed_precision = "fp32"\nnetwork_dim = 1.5\n'
                   'zzz_unknown = 1\n[[datasets]]\nbatch_size = 1\n')
    with pytest.raises(SystemExit) as e:
        read_config(["--config_file", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and str(cfg) in err
    assert "[train]: unknown option 'learing_rate' (did you mean 'learning_rate'?)" in err
    assert "'xformers' is a switch" in err and "'mixed_precision' must be one of no, fp16, bf16" in err
    assert "'network_dim' takes an integer" in err and "unknown option 'zzz_unknown'\n" in err
    assert "'datasets' belongs in a dataset config: give that file with --dataset_config" in err


def test_options_of_other_trainers_are_ignored_with_a_warning(tmp_path, caplog):
    cfg = tmp_path / "c.toml"
    cfg.write_text("mem_eff_save = true\nlearning_rate = 1e-4\n")
    with caplog.at_level(logging.WARNING):
        args = read_config(["--config_file", str(cfg)])
    assert not hasattr(args, "mem_eff_save") and args.learning_rate == 1e-4
    assert "'mem_eff_save' is an option of another FLUX trainer" in caplog.text


def test_missing_and_broken_config_files_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        read_config(["--config_file", str(tmp_path / "nope")])
    assert e.value.code == 1 and "nope.toml not found" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("a = = 1\n")
    with pytest.raises(SystemExit) as e:
        read_config(["--config_file", str(tmp_path / "broken.toml")])
    assert e.value.code == 1 and "not valid TOML" in capsys.readouterr().err


def test_output_config_round_trip_without_secrets(tmp_path):
    out = tmp_path / "written"
    argv = LORA_CLI + ["--wandb_api_key", "SECRET", "--huggingface_token", "HFSECRET", "--config_file", str(out),
                       "--output_config", "--training_comment", 'quote " and \\ and ünïcode']
    with pytest.raises(SystemExit) as e:
        read_config(argv)
    assert e.value.code == 0
    text = (tmp_path / "written.toml").read_text()
    assert "SECRET" not in text and "config_file" not in text and "output_config" not in text
    data = tomllib.loads(text)
    assert data["network_dim"] == 4 and "guidance_scale" in data and "max_train_steps" not in data  # non-defaults
    again = read_config(["--config_file", str(out)])
    original = parse(argv)
    for key, value in vars(original).items():
        if key not in ("config_file", "output_config", "wandb_api_key", "huggingface_token"):
            assert getattr(again, key) == value, key
    with pytest.raises(SystemExit) as e:  # never overwrites
        read_config(argv)
    assert e.value.code == 1


def test_output_config_needs_a_file(capsys):
    with pytest.raises(SystemExit) as e:
        read_config(["--output_config"])
    assert e.value.code == 1 and "--output_config needs --config_file" in capsys.readouterr().err


def test_secrets_on_the_command_line_are_warned(caplog):
    with caplog.at_level(logging.WARNING):
        ta.warn_command_line_secrets(["--wandb_api_key=abc", "--seed", "1"])
    assert "--wandb_api_key on the command line" in caplog.text and "huggingface" not in caplog.text


# --- options without effect ---------------------------------------------------------------------------------------


def test_one_warning_names_exactly_the_ineffective_options_set(caplog):
    p = parser()
    args = p.parse_args(["--clip_skip", "2", "--xformers", "--noise_offset", "0.1", "--multires_noise_discount", "0.3",
                         "--fused_backward_pass", "--seed", "1", "--sdpa"])
    with caplog.at_level(logging.WARNING):
        named = ta.warn_ineffective(args, p, command_lines.LORA)
    assert named == ["--xformers", "--sdpa", "--clip_skip", "--noise_offset", "--fused_backward_pass"]
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert msg.startswith("--xformers, --sdpa, --clip_skip, --noise_offset, --fused_backward_pass have no effect on "
                          "FLUX training: --xformers: FLUX always uses torch scaled_dot_product_attention")
    assert "--multires_noise_discount" not in msg  # given, but the default value


def test_no_warning_for_defaults_and_trainer_specific_lists(caplog):
    p = parser()
    with caplog.at_level(logging.WARNING):
        assert ta.warn_ineffective(p.parse_args([]), p, command_lines.LORA) == []
    assert not caplog.records
    full = parser("full")
    args = full.parse_args(["--save_model_as", "safetensors", "--weighted_captions", "--fused_backward_pass"])
    assert ta.warn_ineffective(args, full, command_lines.FULL) == ["--weighted_captions", "--save_model_as"]
    assert ta.warn_ineffective(full.parse_args(["--fp8_base"]), full, command_lines.FULL) == ["--fp8_base"]
    # effective for LoRA
    assert ta.warn_ineffective(full.parse_args(["--fp8_base"]), parser("network"), command_lines.LORA) == []


def test_every_ineffective_option_exists_in_a_parser():
    names = set(vars(parse([]))) | set(vars(parse([], "full"))) | set(vars(parse([], "controlnet")))
    for table in (ta.INEFFECTIVE_FOR_FLUX, *(c.ineffective for c in command_lines.ALL)):
        assert set(table) <= names


# --- checks and implications --------------------------------------------------------------------------------------


def verify(argv, trainer="network"):
    args = parse((["--network_module", "networks.lora_flux"] if trainer == "network" else []) + argv, trainer)
    return ta.verify_training_args(args, TRAINERS[trainer])


def test_realistic_command_line_verifies():
    args = verify(LORA_CLI)
    assert args.cache_latents and args.cache_text_encoder_outputs and args.fp8_base


def test_implications(caplog):
    args = verify(["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--fp8_base_unet",
                   "--mixed_precision", "bf16", "--cpu_offload_checkpointing", "--sample_every_n_steps", "0",
                   "--sample_every_n_epochs", "-1"])
    assert args.cache_latents and args.cache_text_encoder_outputs and args.fp8_base and args.gradient_checkpointing
    assert args.sample_every_n_steps is None and args.sample_every_n_epochs is None
    with caplog.at_level(logging.WARNING):
        assert verify(["--split_mode"]).blocks_to_swap == 18  # only when --blocks_to_swap was not given
        assert verify(["--split_mode", "--blocks_to_swap", "4"]).blocks_to_swap == 4
    assert "--split_mode is deprecated and ignored" in caplog.text


def test_block_swap_composes_with_cpu_offload_checkpointing():
    for swap, want in ((["--split_mode"], 18), (["--blocks_to_swap", "8"], 8),
                       (["--blocks_to_swap", "auto", "--vram_budget_gb", "8"], "auto")):
        args = verify([*swap, "--cpu_offload_checkpointing"])
        assert args.blocks_to_swap == want and args.cpu_offload_checkpointing
        assert args.gradient_checkpointing  # implied
    assert verify(["--blocks_to_swap", "8", "--cpu_offload_checkpointing"], "full").cpu_offload_checkpointing


def test_deprecated_full_training_options(caplog):
    with caplog.at_level(logging.WARNING):
        args = verify(["--double_blocks_to_swap", "6", "--single_blocks_to_swap", "9", "--skip_latents_validity_check"],
                      "full")
    assert args.blocks_to_swap == 6 + 9 // 2 and args.skip_cache_check
    assert verify(["--single_blocks_to_swap", "4"], "controlnet").blocks_to_swap == 2
    assert "deprecated" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--full_bf16"], "--full_bf16 requires --mixed_precision bf16 (got no)"),
    (["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 requires --mixed_precision fp16"),
    (["--full_fp16", "--full_bf16", "--mixed_precision", "bf16"], "--full_fp16 and --full_bf16 exclude each other"),
    (["--fp8_base_unet"], "require --mixed_precision bf16 or fp16"),
    (["--blocks_to_swap", "-1"], "--blocks_to_swap must be 0 or more"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "together they train nothing"),
    (["--network_args", "train_t5xxl=True", "--cache_text_encoder_outputs_to_disk"], "a trained T5 must encode"),
    (["--network_args", "oops"], "'oops' is not key=value"),
    (["--weighted_captions"], "--weighted_captions is not supported for FLUX"),
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale requires --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "requires --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "cannot be used with --v_parameterization"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
    (["--base_weights", "a", "--base_weights_multiplier", "1", "2"], "2 values for 1 --base_weights"),
    (["--initial_step", "1600"], "--initial_step 1600 must be below --max_train_steps 1600"),
    (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume"),
    (["--metadata_thumbnail", "/no/such.png"], "no such image file"),
])
def test_network_errors(argv, message):
    with pytest.raises(ta.TrainingArgumentError) as e:
        verify(argv)
    assert any(message in line for line in e.value.problems), e.value.problems


def test_every_problem_is_reported_at_once():
    args = parse(["--full_bf16", "--weighted_captions"])
    args.model_type = "sdxl"  # set programmatically: the parser refuses it
    with pytest.raises(ta.TrainingArgumentError) as e:
        ta.verify_training_args(args, command_lines.LORA)
    assert len(e.value.problems) == 4  # model type, weighted captions, full_bf16, network_module
    assert str(e.value).count("\n  ") == 4


def test_full_training_checks(caplog):
    with pytest.raises(ta.TrainingArgumentError) as e:
        verify(["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "full")
    assert len(e.value.problems) == 2
    verify(["--fused_backward_pass", "--optimizer_type", "adafactor", "--weighted_captions"], "full")  # [I] there
    with pytest.raises(ta.TrainingArgumentError, match="schedule-free"):
        verify(["--blockwise_fused_optimizers", "--optimizer_type", "AdamWScheduleFree"], "full")
    args = verify(["--cpu_offload_checkpointing"], "controlnet")
    assert args.gradient_checkpointing


def test_save_last_n_without_a_save_interval_is_noted(caplog):
    with caplog.at_level(logging.WARNING):
        verify(["--save_last_n_steps", "3", "--save_last_n_epochs", "2", "--save_n_epoch_ratio", "2"])
    assert "--save_last_n_steps has no effect without --save_every_n_steps" in caplog.text
    assert "save_last_n_epochs has no effect" not in caplog.text


def test_unknown_trainer_is_a_programming_error():
    with pytest.raises(TypeError, match="TrainerCommandLine"):
        ta.verify_training_args(argparse.Namespace(), "lora")


# --- one line for every mistake, at parse time (issue 14, defect 6) ----------------------------------------------


def parse_error(argv, capsys, trainer="network") -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv, trainer)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    return err


def test_unknown_options_name_the_closest_ones_in_one_line(capsys):
    assert "error: unknown option --netwrk_dim (did you mean --network_dim?); see --help" in \
        parse_error(["--netwrk_dim", "8"], capsys)
    assert "unknown option --zzz_unknown; see --help" in parse_error(["--zzz_unknown"], capsys)
    err = parse_error(["--learing_rate=1e-4", "--mixed_precison", "bf16"], capsys, "full")
    assert "--learing_rate (did you mean --learning_rate?); unknown option --mixed_precison" in err


def test_abbreviations_are_refused(capsys):
    assert "unknown option --network_di (did you mean --network_dim?)" in parse_error(["--network_di", "8"], capsys)
    assert parse(["--network_dim", "8"]).network_dim == 8


@pytest.mark.parametrize("argv, message", [
    (["--network_dim", "0"], "argument --network_dim: must be 1 or more, got 0"),
    (["--learning_rate", "-1"], "argument --learning_rate: must be 0 or more, got -1"),
    (["--learning_rate", "nan"], "argument --learning_rate: must be 0 or more, got nan"),
    (["--unet_lr=-1e-4"], "argument --unet_lr: must be 0 or more, got -1e-4"),
    (["--text_encoder_lr", "1e-4", "-1"], "argument --text_encoder_lr: must be 0 or more, got -1"),
    (["--max_train_steps", "ten"], "argument --max_train_steps: must be an integer 0 or more, got 'ten'"),
    (["--max_train_epochs", "0"], "argument --max_train_epochs: must be 1 or more, got 0"),
    (["--train_batch_size", "0"], "argument --train_batch_size: must be 1 or more, got 0"),
    (["--gradient_accumulation_steps", "-2"], "argument --gradient_accumulation_steps: must be 1 or more, got -2"),
    (["--save_every_n_steps", "0"], "argument --save_every_n_steps: must be 1 or more, got 0"),
    (["--save_every_n_epochs", "0"], "argument --save_every_n_epochs: must be 1 or more, got 0"),
    (["--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    (["--caption_dropout_rate", "1.5"], "argument --caption_dropout_rate: must be from 0 to 1, got 1.5"),
    (["--network_alpha", "-4"], "argument --network_alpha: must be 0 or more, got -4"),
    (["--discrete_flow_shift", "0"], "argument --discrete_flow_shift: must be above 0, got 0"),
    (["--lr_scheduler_num_cycles", "0"], "argument --lr_scheduler_num_cycles: must be 1 or more, got 0"),
])
def test_values_are_checked_as_they_are_parsed(argv, message, capsys):
    assert message in parse_error(argv, capsys)


def test_learning_rate_0_of_one_part_freezes_it_as_in_sd_scripts():
    args = parse(["--unet_lr", "0", "--text_encoder_lr", "0", "1e-5"])
    assert args.unet_lr == 0 and args.text_encoder_lr == [0, 1e-5]
    assert parse(["--guidance_scale", "-2", "--seed", "0"]).guidance_scale == -2  # any float


def test_max_train_steps_0_needs_max_train_epochs():
    with pytest.raises(ta.TrainingArgumentError, match=r"--max_train_steps 0: must be 1 or more \(or give "
                                                       r"--max_train_epochs\)"):
        verify(["--max_train_steps", "0"])
    assert verify(["--max_train_steps", "0", "--max_train_epochs", "2"]).max_train_epochs == 2


def test_config_file_values_get_the_same_checks(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("network_dim = 0\nlearning_rate = -1e-4\ntrain_batch_size = 2\nseed = true\n")
    with pytest.raises(SystemExit) as e:
        read_config(["--config_file", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "'network_dim' must be 1 or more, got 0" in err and "'learning_rate' must be 0 or more, got -0.0001" in err
    assert "'seed' takes a number, not True" in err and "train_batch_size" not in err
    cfg.write_text("network_dim = 8\nlearning_rate = 1e-4\ntext_encoder_lr = [0, 1e-5]\n")
    args = read_config(["--config_file", str(cfg)])
    assert (args.network_dim, args.learning_rate, args.text_encoder_lr) == (8, 1e-4, [0.0, 1e-5])
