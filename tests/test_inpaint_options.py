"""--image, --mask_image, --outpaint (library/cli/inpaint_options.py): parsing and the one-line refusals."""

import argparse

import pytest

from library.cli.inpaint_options import add_inpaint_arguments, check_inpaint_arguments, outpaint_margins
from library.formats.command_line import ArgumentParser


def parse(*argv):
    p = ArgumentParser()
    add_inpaint_arguments(p)
    return p.parse_args(list(argv))


def test_options_parse():
    args = parse("--image", "a.png", "--mask_image", "m.png", "--outpaint", "0, 16,32,8")
    assert (args.image, args.mask_image, args.outpaint) == ("a.png", "m.png", (0, 16, 32, 8))
    assert parse().image is None and parse().outpaint is None


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,-4", "a,b,c,d", "1,2,3,4,5"])
def test_bad_outpaint_is_one_line(text, capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="L,T,R,B"):
        outpaint_margins(text)
    with pytest.raises(SystemExit):
        parse("--outpaint", text)
    assert "--outpaint" in capsys.readouterr().err


def test_given_to_a_model_that_does_not_inpaint_is_refused():
    with pytest.raises(ValueError, match="--image --outpaint: flux1-dev.safetensors \\(dev\\) does not inpaint"):
        check_inpaint_arguments(parse("--image", "a.png", "--outpaint", "0,0,16,0"), "flux1-dev.safetensors (dev)",
                                False)
    check_inpaint_arguments(parse(), "dev", False)
    check_inpaint_arguments(parse("--image", "a.png"), "fill", True)
    with pytest.raises(ValueError, match="need --image"):
        check_inpaint_arguments(parse("--mask_image", "m.png"), "fill", True)


def test_inference_parser_has_them():
    import flux_minimal_inference

    args = flux_minimal_inference.setup_parser().parse_args(
        ["--ckpt_path", "f", "--clip_l", "c", "--t5xxl", "t", "--ae", "a", "--image", "i.png", "--mask_image",
         "m.png", "--outpaint", "0,0,64,0", "--model_type", "fill"])
    assert args.outpaint == (0, 0, 64, 0) and args.model_type == "fill"
