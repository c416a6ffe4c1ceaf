"""Bucketing, resizing and cropping against sd-scripts' rules (reference §3.2-3.5), worked out by hand."""

import logging
import random

import numpy as np
import pytest

from library.data.augment import color_aug, flip_horizontal, gamma, hue_shift
from library.data.buckets import (
                                  BucketChoice,
                                  BucketPlanner,
                                  bucket_info,
                                  get_crop_ltrb,
                                  make_bucket_resolutions,
                                  resize_and_crop,
                                  )


# ----------------------------------------------------------------------------------------------------------------
# Bucket lists (§3.2)

def test_bucket_list_1024_default_limits():
    resos = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    # Every width 256..1024 gets height min(1024, ...) = 1024, mirrored; the square is shared: 13 + 13 - 1.
    expected = sorted({(w, 1024) for w in range(256, 1025, 64)} | {(1024, h) for h in range(256, 1025, 64)})
    assert resos == expected
    assert len(resos) == 25


def test_bucket_list_1024_max_2048():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(resos) == 41
    for r in [(832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1216, 832), (256, 2048), (2048, 256)]:
        assert r in resos
    assert resos == sorted(resos)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    # width 576: (1048576 // 576) = 1820 -> floor to 64 = 1792
    assert (576, 1792) in resos and (576, 1856) not in resos


def test_bucket_list_square_floored_only_to_steps():
    # 700x700: sqrt(490000) = 700 -> square floor(700/64)*64 = 640. The sweep gives (640,704) and (704,640) but
    # never (640,640), so this bucket comes from the square step alone.
    resos = make_bucket_resolutions((700, 700), 256, 704, 64)
    assert (640, 640) in resos


# ----------------------------------------------------------------------------------------------------------------
# Planner settings

def test_planner_rounds_limits_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        p = BucketPlanner(1024, enable_bucket=True, min_bucket_reso=300, max_bucket_reso=1000)
    assert (p.min_bucket_reso, p.max_bucket_reso) == (256, 1024)  # 300 down to 256, 1000 up to 1024
    assert "rounded down to 256" in caplog.text and "rounded up to 1024" in caplog.text


def test_planner_checks_resolution_against_limits():
    with pytest.raises(ValueError, match=r"min_bucket_reso \(512\).*512x256"):
        BucketPlanner((512, 256), enable_bucket=True, min_bucket_reso=512)
    with pytest.raises(ValueError, match=r"max_bucket_reso \(1024\).*1280x768"):
        BucketPlanner((1280, 768), enable_bucket=True, max_bucket_reso=1024)
    with pytest.raises(ValueError, match="bucket_reso_steps"):
        BucketPlanner(1024, enable_bucket=True, bucket_reso_steps=0)


# ----------------------------------------------------------------------------------------------------------------
# Upscale mode selection (§3.3)

@pytest.fixture(scope="module")
def planner_1024():
    return BucketPlanner(1024, enable_bucket=True)  # 25 buckets (w,1024) and (1024,h)


def test_upscale_same_aspect(planner_1024):
    # 1200x900: ar 4/3 equals 1024/768 exactly -> (1024, 768); ar not > bucket ar -> scale 1024/1200;
    # 900 * 1024/1200 = 768 -> resized (1024, 768), no crop.
    assert planner_1024.select((1200, 900)) == BucketChoice((1024, 768), (1024, 768), 0.0)


def test_upscale_nearest_aspect_and_cover(planner_1024):
    # 1000x700: ar 1.428571; 1024/704 = 1.454545 (error 0.026) beats 1024/768 = 1.3333 (0.095).
    # ar < bucket ar -> scale = 1024/1000 = 1.024; height 700*1.024 = 716.8 -> int(717.3) = 717.
    c = planner_1024.select((1000, 700))
    assert c.bucket_reso == (1024, 704) and c.resized_size == (1024, 717)
    assert c.ar_error == pytest.approx(1024 / 704 - 1000 / 700)


def test_upscale_small_image_is_scaled_up(planner_1024):
    # 300x200: ar 1.5; 1024/704 = 1.4545 (error 0.045) beats 1024/640 = 1.6 (0.1).
    # ar > bucket ar -> scale = 704/200 = 3.52 -> (int(1056.5), int(704.5)) = (1056, 704).
    assert planner_1024.select((300, 200)).resized_size == (1056, 704)
    # 500x2000: ar 0.25 == 256/1024 -> scale 256/500 -> (256, 1024).
    assert planner_1024.select((500, 2000)) == BucketChoice((256, 1024), (256, 1024), 0.0)


def test_upscale_image_at_bucket_size_is_not_resized(planner_1024):
    assert planner_1024.select((832, 1024)) == BucketChoice((832, 1024), (832, 1024), 0.0)


def test_upscale_first_minimum_wins():
    # Steps 256, 512x512, limits 256..512 -> buckets [(256,512) ar .5, (512,256) ar 2, (512,512) ar 1].
    p = BucketPlanner(512, enable_bucket=True, min_bucket_reso=256, max_bucket_reso=512, bucket_reso_steps=256)
    assert p.predefined_resos == [(256, 512), (512, 256), (512, 512)]
    # 300x200: ar 1.5 -> errors 1.0, 0.5, 0.5: the tie goes to the first, (512, 256).
    # ar < 2 -> scale 512/300; 200*512/300 = 341.33 -> 341.
    assert p.select((300, 200)) == BucketChoice((512, 256), (512, 341), 0.5)


# ----------------------------------------------------------------------------------------------------------------
# No-upscale mode (§3.3)

@pytest.fixture(scope="module")
def planner_no_upscale():
    return BucketPlanner(1024, enable_bucket=True, bucket_no_upscale=True)  # max area 1048576, steps 64


def test_no_upscale_small_image_keeps_size_and_crops_down(planner_no_upscale):
    # 300x200 <= area: resized = (300, 200); bucket = (300 - 300%64, 200 - 200%64) = (256, 192).
    c = planner_no_upscale.select((300, 200))
    assert c == BucketChoice((256, 192), (300, 200), pytest.approx(256 / 192 - 1.5))
    image = np.zeros((200, 300, 3), np.uint8)
    out, _, _, left_top = resize_and_crop(image, c.resized_size, c.bucket_reso)
    assert out.shape == (192, 256, 3) and left_top == ((300 - 256) // 2, (200 - 192) // 2) == (22, 4)


def test_no_upscale_large_image_candidate_two(planner_no_upscale):
    # 2000x1500: ar 4/3; rw = sqrt(1048576*4/3) = 1182.41, rh = 886.81.
    # cand 1: bw = round_steps(1182.41) = 1182 - 30 = 1152; bh1 = round_steps(864) = 864 - 32 = 832;
    #         error |1152/832 - 4/3| = 0.0513.
    # cand 2: bh = round_steps(886.81) = 887 - 55 = 832; bw2 = round_steps(1109.33) = 1109 - 21 = 1088;
    #         error |1088/832 - 4/3| = 0.0256 -> not strictly worse, so candidate 2:
    # resized = (int(832*4/3 + 0.5), 832) = (1109, 832); bucket = (1109 - 21, 832) = (1088, 832).
    c = planner_no_upscale.select((2000, 1500))
    assert c.bucket_reso == (1088, 832) and c.resized_size == (1109, 832)
    assert c.ar_error == pytest.approx(1088 / 832 - 4 / 3)


def test_no_upscale_large_image_candidate_one(planner_no_upscale):
    # 1100x1206: ar 0.912106; rw = 977.96, rh = 1072.20.
    # cand 1: bw = round_steps(977.96) = 978 - 18 = 960; bh1 = round_steps(960/ar = 1052.51) = 1053 - 29 = 1024;
    #         error |0.9375 - 0.912106| = 0.0254.
    # cand 2: bh = round_steps(1072.20) = 1072 - 48 = 1024; bw2 = round_steps(934.0) = 934 - 38 = 896;
    #         error |0.875 - 0.912106| = 0.0371 -> candidate 1 strictly better:
    # resized = (960, int(1052.51 + 0.5)) = (960, 1053); bucket = (960, 1053 - 29) = (960, 1024).
    c = planner_no_upscale.select((1100, 1206))
    assert c.bucket_reso == (960, 1024) and c.resized_size == (960, 1053)


def test_no_upscale_rejects_empty_bucket(planner_no_upscale):
    with pytest.raises(ValueError, match="empty bucket"):
        planner_no_upscale.select((50, 300))  # width 50 < 64 steps


# ----------------------------------------------------------------------------------------------------------------
# Non-bucket mode: one bucket, resize to cover then centre crop (fix of sd-scripts weakness #11)

def test_non_bucket_mode_resizes_and_centre_crops():
    p = BucketPlanner(512)
    # 800x600: ar 4/3 > 1 -> scale 512/600; width 682.67 -> 683; centre crop left (683-512)//2 = 85.
    c = p.select((800, 600))
    assert c == BucketChoice((512, 512), (683, 512), pytest.approx(1 - 4 / 3))
    image = np.zeros((600, 800, 3), np.uint8)
    out, _, _, left_top = resize_and_crop(image, c.resized_size, c.bucket_reso)
    assert out.shape == (512, 512, 3) and left_top == (85, 0)
    # Smaller images are scaled up the same way (sd-scripts asserted "image size is small" when not caching).
    assert p.select((400, 300)).resized_size == (683, 512)
    assert p.select((512, 512)) == BucketChoice((512, 512), (512, 512), 0.0)
    # A non-square resolution is the only bucket.
    assert BucketPlanner((768, 512)).select((1000, 1000)) == BucketChoice((768, 512), (768, 768), 0.5)


def test_non_bucket_ignores_no_upscale_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        p = BucketPlanner(512, bucket_no_upscale=True)
    assert "no effect" in caplog.text
    assert p.select((300, 200)).bucket_reso == (512, 512)


# ----------------------------------------------------------------------------------------------------------------
# Resize and crop (§3.4)

def _gradient(w, h):
    x = np.arange(w, dtype=np.uint16)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint16)[:, None].repeat(w, 1)
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("interp", [None, "lanczos", "box", "nearest", "bilinear", "linear", "bicubic", "cubic",
                                    "area"])
def test_resize_and_crop_output_sizes(interp):
    image = _gradient(1000, 700)
    alpha = np.ones((700, 1000), np.float32)
    out, a, ltrb, left_top = resize_and_crop(image, (1024, 717), (1024, 704), interp, alpha=alpha)
    assert out.shape == (704, 1024, 3) and out.dtype == np.uint8
    assert a.shape == (704, 1024) and a.dtype == np.float32 and np.allclose(a, 1.0, atol=1e-5)
    assert left_top == (0, (717 - 704) // 2) == (0, 6)


def test_resize_nearest_keeps_exact_pixels():
    image = _gradient(4, 2)
    out, _, _, _ = resize_and_crop(image, (8, 4), (8, 4), "nearest")
    assert np.array_equal(out, image.repeat(2, 0).repeat(2, 1))


def test_no_resize_is_pure_crop():
    image = _gradient(300, 200)
    out, _, _, (left, top) = resize_and_crop(image, (300, 200), (256, 192))
    assert np.array_equal(out, image[top:top + 192, left:left + 256])


def test_random_crop_reproducible_with_seeded_rng():
    image = _gradient(1500, 1100)
    alpha = np.linspace(0, 1, 1500, dtype=np.float32)[None, :].repeat(1100, 0)
    first = resize_and_crop(image, (1500, 1100), (1024, 768), random_crop=True, rng=random.Random(7), alpha=alpha)
    second = resize_and_crop(image, (1500, 1100), (1024, 768), random_crop=True, rng=random.Random(7), alpha=alpha)
    ref = random.Random(7)
    expected = (ref.randint(0, 1500 - 1024), ref.randint(0, 1100 - 768))  # width first, then height
    assert first[3] == second[3] == expected
    left, top = expected
    assert np.array_equal(first[0], image[top:top + 768, left:left + 1024])
    assert np.array_equal(first[1], alpha[top:top + 768, left:left + 1024])
    # crop_ltrb does not follow the random window (sd-scripts records the centred placement).
    assert first[2] == get_crop_ltrb((1024, 768), (1500, 1100))
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop(image, (1500, 1100), (1024, 768), random_crop=True)


def test_resize_must_cover_bucket():
    with pytest.raises(ValueError, match="does not cover"):
        resize_and_crop(_gradient(100, 100), (100, 100), (128, 128))
    with pytest.raises(ValueError, match="unknown interpolation"):
        resize_and_crop(_gradient(100, 100), (200, 200), (128, 128), "sinc")


def test_crop_ltrb_values():
    # bucket (1024,704) ar 1.4545 > image ar 1.428571: box 704 tall, 704*1.428571 = 1005.714 wide;
    # left = floor((1024 - 1005.714)/2) = floor(9.143) = 9, right = 9 + 1005.714 = 1014.714.
    left, top, right, bottom = get_crop_ltrb((1024, 704), (1000, 700))
    assert (left, top, bottom) == (9.0, 0.0, 704.0) and right == pytest.approx(9 + 704 * 1000 / 700)
    # bucket (1024,768) ar 1.333 < image ar 1.5 (1200x800): box 1024 wide, 1024/1.5 = 682.667 tall;
    # top = floor((768 - 682.667)/2) = floor(42.667) = 42, bottom = 42 + 682.667.
    left, top, right, bottom = get_crop_ltrb((1024, 768), (1200, 800))
    assert (left, top, right) == (0.0, 42.0, 1024.0) and bottom == pytest.approx(42 + 1024 / 1.5)
    # same aspect: the box is the whole bucket
    assert get_crop_ltrb((1024, 768), (1200, 900)) == (0.0, 0.0, 1024.0, 768.0)


# ----------------------------------------------------------------------------------------------------------------
# bucket_info

def test_bucket_info_counts_repeats_and_numbers_like_sd_scripts():
    p = BucketPlanner(1024, enable_bucket=True)
    a, b = p.select((1200, 900)), p.select((1000, 700))  # (1024,768) error 0, (1024,704) error 0.026
    info = p.bucket_info([(a, 3), (b, 2), a])
    index = {r: i for i, r in enumerate(p.predefined_resos)}
    assert info["buckets"] == {
        index[(1024, 704)]: {"resolution": [1024, 704], "count": 2},
        index[(1024, 768)]: {"resolution": [1024, 768], "count": 4},
    }
    assert info["mean_img_ar_error"] == pytest.approx(abs(b.ar_error) / 3)
    # Without predefined buckets (no-upscale mode), indices are dense in sorted order.
    info = bucket_info([BucketChoice((256, 192), (300, 200), -0.1), BucketChoice((128, 128), (130, 130), 0.0)])
    assert info["buckets"] == {0: {"resolution": [128, 128], "count": 1}, 1: {"resolution": [256, 192], "count": 1}}
    assert bucket_info([])["mean_img_ar_error"] is None


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (§3.5)

def test_flip_horizontal():
    image = _gradient(5, 3)
    alpha = np.arange(15, dtype=np.float32).reshape(3, 5)
    fi, fa = flip_horizontal(image, alpha)
    assert np.array_equal(fi, image[:, ::-1]) and np.array_equal(fa, alpha[:, ::-1])
    assert flip_horizontal(image, None)[1] is None


def test_hue_shift_treats_rgb_as_rgb():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    # Pure red is hue 0; +60 OpenCV units (120 degrees) is pure green in RGB order.
    assert tuple(hue_shift(red, 60)[0, 0]) == (0, 255, 0)
    # A small shift moves red towards yellow (green rises), not towards magenta (as a BGR reading would).
    shifted = hue_shift(red, 8)[0, 0]
    assert shifted[0] == 255 and shifted[1] > 0 and shifted[2] == 0


def test_gamma_and_color_aug_draws():
    image = _gradient(16, 16)
    assert np.array_equal(gamma(image, 1.0), image)
    assert gamma(np.array([[[128, 0, 255]]], np.uint8), 1.05)[0, 0].tolist() == [
        round((128 / 255) ** 1.05 * 255), 0, 255]
    outcomes = set()
    for seed in range(200):
        rng = random.Random(seed)
        out = color_aug(image, rng)
        ref = random.Random(seed)
        if ref.random() >= 0.33:
            assert out is image
            outcomes.add("none")
        elif ref.random() < 0.5:
            assert np.array_equal(out, hue_shift(image, ref.uniform(-8, 8)))
            outcomes.add("hue")
        else:
            assert np.array_equal(out, gamma(image, ref.uniform(0.95, 1.05)))
            outcomes.add("gamma")
    assert outcomes == {"none", "hue", "gamma"}
