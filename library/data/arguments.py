"""sd-scripts' dataset command-line options (reference 1.5), as one argparse group for every trainer.

Only cheap imports here: the trainers' --help must stay fast.
"""

from __future__ import annotations

import argparse

from library.data.schema import INTERPOLATIONS
from library.formats.command_line import fraction, non_negative_float, non_negative_int, positive_int


def add_dataset_arguments(parser: argparse.ArgumentParser, *, support_dreambooth: bool = True,
                          support_caption_dropout: bool = True, support_controlnet: bool = False) -> None:
    """Add sd-scripts' dataset options (names, types, defaults of reference 1.5) and the dataset-related extras.

    `support_dreambooth=False` (ControlNet trainer) leaves out --reg_data_dir and --prior_loss_weight;
    `support_caption_dropout=False` leaves out the three caption dropout options.
    """
    g = parser.add_argument_group("dataset")
    add = g.add_argument
    add("--dataset_config", type=str, default=None,
        help="dataset config file (.toml or .json); when given, --train_data_dir, --reg_data_dir and --in_json are "
             "ignored")
    add("--train_data_dir", type=str, default=None,
        help="ControlNet: image folder; otherwise a folder of <repeats>_<class tokens> subfolders (DreamBooth), "
             "or the image folder for --in_json")
    if support_dreambooth:
        add("--reg_data_dir", type=str, default=None,
            help="folder of <repeats>_<class tokens> subfolders of regularisation images")
    add("--in_json", type=str, default=None,
        help="fine-tuning metadata file (.json/.jsonl); relative image keys are in --train_data_dir")
    add("--dataset_repeats", type=positive_int, default=1, help="num_repeats of subsets that do not set it")
    add("--cache_info", action="store_true", help="DreamBooth: cache captions and image sizes in "
        "<image_dir>/metadata_cache.json")
    add("--shuffle_caption", action="store_true", help="shuffle the separator-split caption tags")
    add("--caption_separator", type=str, default=",", help="tag separator of captions (default: ,)")
    add("--caption_extension", type=str, default=".caption",
        help="caption file extension (default: .caption); a leading dot is added when missing")
    add("--caption_extention", type=str, default=None, help="misspelled alias of --caption_extension (sd-scripts)")
    add("--keep_tokens", type=non_negative_int, default=0,
        help="keep the first N tags in place when shuffling or dropping")
    add("--keep_tokens_separator", type=str, default="",
        help="separator marking the fixed leading part of captions (e.g. |||), instead of --keep_tokens")
    add("--secondary_separator", type=str, default=None,
        help="separator inside a tag group, replaced by --caption_separator after shuffling")
    add("--enable_wildcard", action="store_true", help="{a|b} wildcards and multi-line captions (a random line)")
    add("--caption_prefix", type=str, default=None, help="text put before every caption (with a space)")
    add("--caption_suffix", type=str, default=None, help="text put after every caption (with a space)")
    add("--color_aug", action="store_true", help="weak colour augmentation (not with latent caching)")
    add("--flip_aug", action="store_true", help="random horizontal flips")
    add("--face_crop_aug_range", type=str, default=None,
        help="face-centred crop augmentation range \"low,high\" (e.g. 2.0,4.0; without bucketing)")
    add("--random_crop", action="store_true", help="random instead of centre crop (not with latent caching)")
    add("--debug_dataset", action="store_true", help="show the training images and captions instead of training")
    add("--resolution", type=str, default=None, help="training resolution: \"size\" or \"width,height\"")
    add("--cache_latents", action="store_true", help="encode images to latents once and keep them in memory")
    add("--vae_batch_size", type=positive_int, default=1, help="batch size of latent caching (default: 1)")
    add("--cache_latents_to_disk", action="store_true",
        help="cache latents in *_flux.npz files beside the images (implies --cache_latents)")
    add("--skip_cache_check", action="store_true", help="trust existing cache files without checking their content")
    add("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    add("--min_bucket_reso", type=positive_int, default=256, help="smallest bucket side (default: 256)")
    add("--max_bucket_reso", type=positive_int, default=1024, help="largest bucket side (default: 1024)")
    add("--bucket_reso_steps", type=positive_int, default=64,
        help="bucket side granularity; a multiple of 16 for FLUX (default: 64)")
    add("--bucket_no_upscale", action="store_true", help="buckets per image size, never enlarging images")
    add("--resize_interpolation", type=str, default=None, choices=INTERPOLATIONS,
        help="resize filter (default: area when shrinking, lanczos when enlarging)")
    add("--token_warmup_min", type=non_negative_int, default=1,
        help="tags used at the start of the token warm-up (default: 1)")
    add("--token_warmup_step", type=non_negative_float, default=0,
        help="step at which all tags are used; below 1 a fraction of max_train_steps (default: 0, off)")
    add("--alpha_mask", action="store_true", help="use the images' alpha channel as loss mask")
    add("--dataset_class", type=str, default=None, help="package.module.Class of a custom dataset")
    if support_caption_dropout:
        add("--caption_dropout_rate", type=fraction, default=0.0, help="probability of training with an empty caption")
        add("--caption_dropout_every_n_epochs", type=non_negative_int, default=0,
            help="use empty captions in every N-th epoch (default: 0, off)")
        add("--caption_tag_dropout_rate", type=fraction, default=0.0, help="probability of dropping each tag")
    add("--train_batch_size", type=positive_int, default=1,
        help="batch size per device (batch_size of datasets; default: 1)")
    if support_dreambooth:
        add("--prior_loss_weight", type=non_negative_float, default=1.0,
            help="loss weight of regularisation images (default: 1)")
    cond_help = ("conditioning image folder (same file names as --train_data_dir)" if support_controlnet else
                 "ControlNet conditioning folder; for masks use 'conditioning_data_dir' in the dataset config")
    add("--conditioning_data_dir", type=str, default=None, help=cond_help)
    add("--masked_loss", action="store_true",
        help="apply loss masks (alpha_mask, or conditioning images of dataset config subsets)")
    add("--cache_text_encoder_outputs", action="store_true",
        help="encode captions once and keep the text encoder outputs in memory")
    add("--cache_text_encoder_outputs_to_disk", action="store_true",
        help="cache text encoder outputs in *_flux_te.npz files (implies --cache_text_encoder_outputs)")
    add("--text_encoder_batch_size", type=positive_int, default=None,
        help="batch size of text encoder caching (default: the dataset batch size)")
    add("--skip_bad_images", action="store_true",
        help="report and skip unreadable images instead of stopping (also images that fail to decode mid-run: "
             "another image of the same bucket takes their place)")
    add("--verify_images", action="store_true",
        help="decode every image in full before training, which finds data corrupted behind a valid header "
             "(the default check reads headers only); measured on one core: 0.14 ms per 64x64 demo "
             "image, 7 ms per 512x512 PNG, 20 ms (JPEG) to 37 ms (PNG) per 1024x1024 image")
