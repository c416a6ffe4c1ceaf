"""The per-model defaults table and the rule that names a file's variant (library/models/variants.py)."""

import argparse

import pytest

from library.models.variants import VARIANTS, resolve_variant, variant_from_metadata
from library.training.setup import flow_matching_settings


def test_defaults_table_holds_each_models_published_defaults():
    dev, krea, schnell, kontext = (VARIANTS[n] for n in ("dev", "krea", "schnell", "kontext"))
    assert (dev.steps, dev.guidance, dev.shift, dev.t5_max_length, dev.training_guidance) == (50, 3.5, True, 512, 3.5)
    assert (schnell.steps, schnell.guidance, schnell.shift, schnell.t5_max_length) == (4, None, False, 256)
    assert schnell.training_guidance is None and not schnell.has_guidance_input and schnell.licence == "Apache-2.0"
    assert krea.guidance == 4.5 and krea.architecture == "flux-1-krea-dev"
    assert (kontext.steps, kontext.guidance, kontext.training_guidance) == (30, 2.5, 1.0) and kontext.reference_images


def test_keys_decide_dev_or_schnell_and_metadata_names_the_rest():
    assert resolve_variant(None, has_guidance_input=True).name == "dev"
    assert resolve_variant("flux", has_guidance_input=False).name == "schnell"
    kontext_file = {"modelspec.architecture": "flux-1-kontext-dev"}
    assert resolve_variant("flux", has_guidance_input=True, metadata=kontext_file).name == "kontext"
    assert variant_from_metadata({"modelspec.architecture": "flux-1-krea-dev/lora"}).name == "krea"
    assert variant_from_metadata({"modelspec.architecture": "something-else"}) is None
    # metadata that the keys contradict is not believed
    assert resolve_variant(None, has_guidance_input=False, metadata=kontext_file).name == "schnell"
    assert resolve_variant("krea", has_guidance_input=True).name == "krea"  # named: keys cannot tell


@pytest.mark.parametrize("model_type, has_guidance, expected", [
    ("schnell", True, "--model_type schnell does not fit f.safetensors: it has a guidance embedder"),
    ("kontext", False, "--model_type kontext does not fit f.safetensors: it has no guidance embedder (schnell)"),
    ("dev", False, "use --model_type schnell"),
    ("sdxl", True, "--model_type sdxl: unknown"),
])
def test_a_model_type_the_keys_contradict_is_refused(model_type, has_guidance, expected):
    with pytest.raises(ValueError) as e:
        resolve_variant(model_type, has_guidance_input=has_guidance, source="f.safetensors")
    assert expected in str(e.value)


def test_training_guidance_defaults_to_the_models_and_the_option_wins():
    unset = argparse.Namespace(guidance_scale=None)
    assert flow_matching_settings(unset, VARIANTS["dev"]).guidance_scale == 3.5  # sd-scripts' default
    assert flow_matching_settings(unset, VARIANTS["kontext"]).guidance_scale == 1.0
    assert flow_matching_settings(argparse.Namespace(guidance_scale=2.0), VARIANTS["kontext"]).guidance_scale == 2.0


def test_input_channels_must_fit_the_named_model():
    with pytest.raises(ValueError, match="its img_in takes 384 features per token, dev takes 64"):
        resolve_variant("dev", has_guidance_input=True, in_channels=384, source="fill.safetensors")
    with pytest.raises(ValueError, match="no known model has these keys"):
        resolve_variant(None, has_guidance_input=True, in_channels=100, source="odd.safetensors")
