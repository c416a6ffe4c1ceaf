"""File names, save_last_n pruning, ss_* / modelspec.* metadata and train_state.json (reference 13, 18.1, 18.6)."""

import argparse
import base64
import datetime
import hashlib
import json

import pytest

from library.training import arguments as ta
from library.training.recipes import command_lines
from library.formats import metadata as tm

try:
    from library.training.optimizers import add_optimizer_arguments
except ImportError:  # written concurrently by another engineer
    def add_optimizer_arguments(parser):
        group = parser.add_argument_group("optimizer")

        def add(*a, **kw):
            group.add_argument(*a, help="stand-in", **kw)

        add("--learning_rate", type=float, default=2e-6)
        add("--max_grad_norm", type=float, default=1.0)
        add("--lr_scheduler", type=str, default="constant")
        add("--lr_warmup_steps", type=int, default=0)

# Reference 13.3, in the order written there.
ALWAYS = """ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation
ss_model_type ss_apply_t5_attn_mask ss_weighting_scheme ss_logit_mean ss_logit_std ss_mode_scale ss_guidance_scale
ss_timestep_sampling ss_sigmoid_scale ss_model_prediction_type ss_discrete_flow_shift""".split()
WITH_CONFIG = ["ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"]
WITHOUT_CONFIG = """ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug ss_random_crop
ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso ss_keep_tokens
ss_dataset_dirs ss_reg_dataset_dirs ss_tag_frequency ss_bucket_info""".split()


def parse(argv):
    p = ta.training_parser(command_lines.LORA, add_optimizer_arguments=add_optimizer_arguments)
    return p.parse_args(["--network_module", "networks.lora_flux"] + argv)


def subset(image_dir, img_count=3, repeats=10, **kw):
    return {"image_dir": image_dir, "img_count": img_count, "num_repeats": repeats, **kw}


DATASETS = [
    {"is_dreambooth": True, "batch_size": 2, "num_train_images": 50, "num_reg_images": 20, "resolution": (1024, 1024),
     "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
     "tag_frequency": {"10_sks dog": {"sks dog": 3}, "1_dog": {"dog": 20}},
     "buckets": [{"resolution": (896, 1152), "count": 30}, {"resolution": (1024, 1024), "count": 40}],
     "mean_img_ar_error": 0.01,
     "subsets": [subset("/data/train/10_sks dog", 5, 10, class_tokens="sks dog", flip_aug=True),
                 subset("/data/reg/1_dog", 20, 1, class_tokens="dog", is_reg=True)]},
    {"is_dreambooth": False, "batch_size": 1, "num_train_images": 4, "num_reg_images": 0, "resolution": (512, 512),
     "tag_frequency": {"10_sks dog": {"other": 1}, "meta.json": {"a": 1}},
     "subsets": [subset("/other/10_sks dog", 4, 1, metadata_file="/other/meta.json"),
                 subset("/x/10_sks dog/", 2, 2)]},
]


def metadata(args, datasets=DATASETS, **kw):
    values = dict(network_module="networks.lora_flux", network_dim=4, network_alpha=1.0, datasets_info=datasets,
                  num_train_images=54, num_reg_images=20, num_batches_per_epoch=35, num_epochs=4, max_train_steps=140,
                  optimizer_text="torch.optim.adamw.AdamW(weight_decay=0.01)", session_id=123,
                  training_started_at=1700000000.5)
    values.update(kw)
    return tm.lora_metadata(args, **values)


# --- names --------------------------------------------------------------------------------------------------------


def test_checkpoint_and_state_names():
    assert tm.checkpoint_filename("lora", ".safetensors", epoch=3) == "lora-000003.safetensors"
    assert tm.checkpoint_filename("lora", "safetensors", step=1500) == "lora-step00001500.safetensors"
    assert tm.checkpoint_filename("lora", ".pt") == "lora.pt"
    assert tm.checkpoint_filename(None, epoch=1) == "epoch-000001.safetensors"
    assert tm.checkpoint_filename(None, step=7) == "at-step00000007.safetensors"
    assert tm.checkpoint_filename(None) == "last.safetensors"
    assert tm.state_dirname("lora", epoch=2) == "lora-000002-state"
    assert tm.state_dirname("lora", step=100) == "lora-step00000100-state"
    assert (tm.state_dirname(None), tm.state_dirname(None, epoch=1), tm.state_dirname(None, step=1)) == \
        ("last-state", "epoch-000001-state", "at-step00000001-state")
    with pytest.raises(ValueError):
        tm.checkpoint_filename("x", epoch=1, step=1)
    assert tm.model_extension(parse(["--save_model_as", "pt"])) == ".pt"
    assert tm.model_extension(argparse.Namespace(save_model_as=None), "full") == ".safetensors"


def test_when_to_save():
    args = argparse.Namespace(save_every_n_epochs=2, save_n_epoch_ratio=None, save_every_n_steps=100)
    assert [e for e in range(1, 7) if tm.is_epoch_save(args, e, 6)] == [2, 4]  # 6: the final save covers it
    assert [s for s in (50, 100, 150, 200) if tm.is_step_save(args, s)] == [100, 200]
    args.save_n_epoch_ratio = 4
    assert tm.save_every_n_epochs(args, 10) == 2 and tm.save_every_n_epochs(args, 3) == 1


def names(args, **kw):
    paths = tm.files_to_remove_for_save_last_n(args, "out", ".safetensors", **kw)
    assert all(p.parent.name == "out" for p in paths)
    return [p.name for p in paths]


def simulate(args, saves, key):
    """Save at each point and delete what files_to_remove_for_save_last_n lists; return what is left."""
    kept = set()
    for n in saves:
        kept.add(tm.checkpoint_filename(args.output_name, ".safetensors", **{key: n}))
        if args.save_state:
            kept.add(tm.state_dirname(args.output_name, **{key: n}))
        kept -= {p.name for p in tm.files_to_remove_for_save_last_n(args, "out", ".safetensors", **{key: n})}
    return kept


def test_save_last_n_steps():
    args = argparse.Namespace(output_name="lora", save_every_n_steps=100, save_last_n_steps=200,
                              save_last_n_steps_state=None, save_state=False)
    assert names(args, step=300) == []  # r = 0: never saved
    assert names(args, step=400) == ["lora-step00000100.safetensors"]
    assert simulate(args, range(100, 1001, 100), "step") == {f"lora-step{s:08d}.safetensors" for s in (800, 900, 1000)}
    args.save_state, args.save_last_n_steps_state = True, 100
    assert names(args, step=400) == [
        "lora-step00000100.safetensors", "lora-step00000200-state"]
    args.save_last_n_steps = None  # states only
    assert names(args, step=400) == ["lora-step00000200-state"]


def test_save_last_n_epochs():
    args = argparse.Namespace(output_name=None, save_every_n_epochs=2, save_last_n_epochs=2,
                              save_last_n_epochs_state=1, save_state=True, save_n_epoch_ratio=None)
    assert names(args, epoch=4) == ["epoch-000002-state"]
    assert names(args, epoch=6) == [
        "epoch-000002.safetensors", "epoch-000004-state"]
    left = simulate(args, range(2, 11, 2), "epoch")
    assert left == {"epoch-000008.safetensors", "epoch-000010.safetensors", "epoch-000010-state"}
    args.save_last_n_epochs = args.save_last_n_epochs_state = None
    assert names(args, epoch=10) == []
    args.save_every_n_epochs, args.save_n_epoch_ratio, args.save_last_n_epochs, args.save_state = None, 5, 1, False
    assert names(args, epoch=6) == []  # the interval comes from the ratio: needs num_train_epochs
    assert names(args, epoch=6, num_train_epochs=10) == ["epoch-000004.safetensors"]


# --- ss_* ---------------------------------------------------------------------------------------------------------


def test_every_ss_key_with_dataset_config():
    args = parse(["--dataset_config", "d.toml", "--seed", "42", "--text_encoder_lr", "1e-5", "5e-5",
                  "--network_args", "train_blocks=single", "loraplus_lr_ratio=4", "--network_dropout", "0.1",
                  "--face_crop_aug_range", "2.0,4.0", "--gradient_checkpointing", "--model_prediction_type", "raw",
                  "--pretrained_model_name_or_path", "/missing/flux1-dev.safetensors", "--output_name", "mylora"])
    md = metadata(args)
    expected = set(ALWAYS + WITH_CONFIG + ["ss_network_args", "ss_sd_model_name"])
    assert set(md) == expected
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_text_encoder_lr"] == "[1e-05, 5e-05]" and md["ss_unet_lr"] == "None"
    assert md["ss_gradient_checkpointing"] == "True" and md["ss_v2"] == "False" and md["ss_full_fp16"] == "False"
    assert md["ss_face_crop_aug_range"] == "(2.0, 4.0)" and md["ss_seed"] == "42"
    assert md["ss_training_started_at"] == "1700000000.5" and md["ss_session_id"] == "123"
    assert md["ss_base_model_version"] == "flux1" and md["ss_model_type"] == "flux"
    assert md["ss_sd_scripts_commit_hash"] == "(unknown)" and md["ss_network_alpha"] == "1.0"
    assert md["ss_discrete_flow_shift"] == "3.0" and md["ss_model_prediction_type"] == "raw"
    assert md["ss_sd_model_name"] == "/missing/flux1-dev.safetensors"  # not a file: the path as given
    assert json.loads(md["ss_network_args"]) == {"train_blocks": "single", "loraplus_lr_ratio": "4", "dropout": 0.1}
    assert md["ss_network_args"] == '{"train_blocks": "single", "loraplus_lr_ratio": "4", "dropout": 0.1}'

    datasets = json.loads(md["ss_datasets"])
    first = datasets[0]
    assert first["resolution"] == [1024, 1024] and first["batch_size_per_device"] == 2
    assert first["bucket_info"] == {"buckets": {"0": {"resolution": [896, 1152], "count": 30},
                                                "1": {"resolution": [1024, 1024], "count": 40}},
                                    "mean_img_ar_error": 0.01}
    assert list(first["subsets"][0]) == [
        "img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens",
        "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
        "resize_interpolation", "image_dir", "class_tokens", "is_reg"]
    assert first["subsets"][0]["image_dir"] == "10_sks dog" and first["subsets"][0]["flip_aug"] is True
    assert first["subsets"][1]["is_reg"] is True
    ft = datasets[1]["subsets"][0]
    assert ft["metadata_file"] == "meta.json" and "is_reg" not in ft and "class_tokens" not in ft
    assert datasets[1]["bucket_info"] is None
    # reg folders left out, duplicate names numbered, metadata files named by basename
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 5},
                                                 "meta.json": {"n_repeats": 1, "img_count": 4},
                                                 "10_sks dog (2)": {"n_repeats": 2, "img_count": 2}}
    # first occurrence of each folder wins
    assert json.loads(md["ss_tag_frequency"]) == {"10_sks dog": {"sks dog": 3}, "1_dog": {"dog": 20},
                                                  "meta.json": {"a": 1}}


def test_every_ss_key_without_dataset_config(tmp_path):
    model = tmp_path / "flux1-dev.safetensors"
    model.write_bytes(b"x" * 10)
    args = parse(["--train_data_dir", "train", "--resolution", "1024,768", "--train_batch_size", "2",
                  "--gradient_accumulation_steps", "3", "--flip_aug", "--keep_tokens", "1",
                  "--pretrained_model_name_or_path", str(model), "--vae", "sdxl_vae.safetensors"])
    md = metadata(args, datasets=DATASETS[:1], num_processes=2, sd_model_hashes=("abcd1234", "f" * 64),
                  vae_hashes=("11112222", "e" * 64), commit="0123abc")
    expected = set(ALWAYS + WITHOUT_CONFIG + ["ss_network_args", "ss_sd_model_name", "ss_sd_model_hash",
                                              "ss_new_sd_model_hash", "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"])
    assert set(md) == expected
    assert md["ss_resolution"] == "(1024, 768)" and md["ss_total_batch_size"] == "12"
    assert md["ss_batch_size_per_device"] == "2" and md["ss_flip_aug"] == "True" and md["ss_color_aug"] == "False"
    assert md["ss_enable_bucket"] == "True" and md["ss_max_bucket_reso"] == "2048"  # the dataset's values
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 5}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 20}}
    assert json.loads(md["ss_bucket_info"])["buckets"]["1"] == {"resolution": [1024, 1024], "count": 40}
    assert md["ss_sd_model_name"] == "flux1-dev.safetensors" and md["ss_sd_model_hash"] == "abcd1234"
    assert md["ss_vae_name"] == "sdxl_vae.safetensors" and md["ss_new_vae_hash"] == "e" * 64
    assert md["ss_sd_scripts_commit_hash"] == "0123abc" and md["ss_network_args"] == '{"dropout": null}'


def test_no_metadata_keeps_the_minimal_set_and_saves_add_only_modelspec():
    md = metadata(parse(["--no_metadata", "--network_args", "train_blocks=single"]), network_dim=16,
                  network_alpha=8.0)
    assert md == {"ss_v2": "False", "ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
                  "ss_network_dim": "16", "ss_network_alpha": "8.0",
                  "ss_network_args": '{"train_blocks": "single", "dropout": null}'}
    saved = tm.update_for_save(md, 2, 100, modelspec={"modelspec.title": "t"})
    assert saved == {**md, "modelspec.title": "t"}


def test_update_for_save():
    md = metadata(parse([]))
    saved = tm.update_for_save(md, epoch=3, steps=120, finished_at=1700000100.25,
                               modelspec=tm.modelspec_metadata(parse([]), architecture="flux-1-dev", timestamp=1.0))
    assert (saved["ss_epoch"], saved["ss_steps"], saved["ss_training_finished_at"]) == ("3", "120", "1700000100.25")
    assert saved["modelspec.architecture"] == "flux-1-dev/lora" and "ss_steps" not in md  # a copy
    assert all(isinstance(v, str) for v in saved.values())


# --- modelspec ----------------------------------------------------------------------------------------------------


def test_modelspec_lora_dev_and_schnell():
    ts = 1700000000.75
    md = tm.modelspec_metadata(parse(["--output_name", "mylora"]), architecture="flux-1-dev", timestamp=ts,
                               commit="abc")
    assert md == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux", "modelspec.title": "mylora",
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.fromtimestamp(ts).replace(microsecond=0).isoformat(),
        "modelspec.implementation_version": "flux-train-suite/abc"}
    assert "." not in md["modelspec.date"] and "T" in md["modelspec.date"]
    schnell = tm.modelspec_metadata(parse(["--resolution", "1024,768"]), architecture="flux-1-schnell", timestamp=ts)
    assert schnell["modelspec.architecture"] == "flux-1-schnell/lora"
    assert schnell["modelspec.title"] == f"LoRA@{ts}" and schnell["modelspec.resolution"] == "1024x768"
    assert schnell["modelspec.implementation_version"] == "flux-train-suite/unknown"
    assert "modelspec.prediction_type" not in schnell and "modelspec.timestep_range" not in schnell


def test_modelspec_full_models():
    full = argparse.Namespace(output_name=None, resolution="512", metadata_title=None)
    dev = tm.modelspec_metadata(full, architecture="flux-1-dev", lora=False, timestamp=5.0)
    assert dev["modelspec.architecture"] == "flux-1-dev" and dev["modelspec.title"] == "Checkpoint@5.0"
    assert dev["modelspec.resolution"] == "512x512"
    schnell = tm.modelspec_metadata(full, architecture="flux-1-schnell", lora=False, resolution=(768, 1344), title="ft")
    assert schnell["modelspec.architecture"] == "flux-1-schnell"  # sd-scripts says flux-1-dev (reference 17.18)
    assert schnell["modelspec.resolution"] == "768x1344" and schnell["modelspec.title"] == "ft"


def test_modelspec_options(tmp_path):
    thumb = tmp_path / "t.png"
    thumb.write_bytes(b"\x89PNG fake")
    args = parse(["--metadata_title", "T", "--metadata_author", "me", "--metadata_description", "d",
                  "--metadata_license", "apache-2.0", "--metadata_tags", "a,b", "--metadata_trigger_phrase", "sks",
                  "--metadata_thumbnail", str(thumb), "--min_timestep", "100", "--clip_skip", "2",
                  "--output_name", "ignored"])
    md = tm.modelspec_metadata(args, architecture="flux-1-dev", title="also ignored")
    assert md["modelspec.title"] == "T" and md["modelspec.author"] == "me" and md["modelspec.tags"] == "a,b"
    assert md["modelspec.description"] == "d" and md["modelspec.license"] == "apache-2.0"
    assert md["modelspec.trigger_phrase"] == "sks" and md["modelspec.timestep_range"] == "100,1000"
    assert md["modelspec.encoder_layer"] == "2"
    assert md["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert not any(k.endswith(("usage_hint", "merged_from", "preprocessor", "is_negative_embedding")) for k in md)
    assert tm.thumbnail_data_url("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"


# --- train_state.json, hashes -------------------------------------------------------------------------------------


def test_train_state_round_trip(tmp_path):
    assert json.loads(tm.train_state_json(2, 150)) == {"current_epoch": 2, "current_step": 150}
    state = tmp_path / "lora-step00000150-state"
    path = tm.write_train_state(state, 2, 150)
    assert path == state / "train_state.json"
    assert tm.read_train_state(state) == tm.TrainState(2, 150) == tm.read_train_state(path)
    assert tm.read_train_state(tmp_path) is None
    tm.write_train_state(state, 3, 200, seed=42)
    assert tm.read_train_state(state) == tm.TrainState(3, 200, {"seed": 42})
    path.write_text('{"current_epoch": 1}')
    with pytest.raises(ValueError, match="current_step"):
        tm.read_train_state(state)
    path.write_text('{"current_epoch": 1, "current_step": -3}')
    with pytest.raises(ValueError, match="integers >= 0"):
        tm.read_train_state(state)


def test_file_hashes(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB
    f = tmp_path / "m.safetensors"
    f.write_bytes(data)
    legacy, full = tm.file_hashes(f)
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert full == hashlib.sha256(data).hexdigest()
    assert tm.file_hashes(tmp_path) is None and tm.file_hashes(tmp_path / "none") is None


def test_source_commit_reads_this_checkout():
    commit = tm.source_commit()
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
