"""Image discovery, header probing, corruption checks and decoding (reference §3.1, §3.6)."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from library.data.images import (
                                 BadImageError,
                                 ImageProbe,
                                 check_images,
                                 list_images,
                                 load_image,
                                 probe_image,
                                 )


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _halves(w=40, h=20):
    """Stored image: left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    return Image.fromarray(a)


def _noise_jpeg(path, w=96, h=64, **kw):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, "JPEG", quality=90, **kw)
    return path


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", "f.txt", "g.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]


# ----------------------------------------------------------------------------------------------------------------
# Orientation

def test_exif_rotated_jpeg_reports_swapped_size_and_loads_upright(tmp_path):
    path = tmp_path / "rot.jpg"
    _halves().save(path, "JPEG", quality=95, exif=_exif(6))  # 6: display rotated 90 degrees clockwise
    probe = probe_image(path)
    assert probe == ImageProbe(path, (20, 40), "RGB", False, "JPEG", 6)
    rgb, alpha = load_image(path)
    assert rgb.shape == (40, 20, 3) and alpha is None
    # Rotating clockwise brings the stored left (red) half to the top.
    assert rgb[5, 10, 0] > 200 and rgb[5, 10, 2] < 60
    assert rgb[35, 10, 2] > 200 and rgb[35, 10, 0] < 60


def test_exif_orientation_without_swap(tmp_path):
    path = tmp_path / "r180.jpg"
    _halves().save(path, "JPEG", quality=95, exif=_exif(3))
    assert probe_image(path).size == (40, 20)
    rgb, _ = load_image(path)
    assert rgb[10, 5, 2] > 200  # rotated 180: blue now on the left


def test_png_exif_after_image_data_is_found_without_decoding(tmp_path, monkeypatch):
    buf = io.BytesIO()
    _halves().save(buf, "PNG")
    data = buf.getvalue()
    iend = data.rindex(b"IEND") - 4
    exif_payload = _exif(8).tobytes()[6:]  # PNG eXIf holds the TIFF structure without the "Exif\0\0" prefix
    path = tmp_path / "late_exif.png"
    path.write_bytes(data[:iend] + _png_chunk(b"eXIf", exif_payload) + data[iend:])
    with monkeypatch.context() as m:
        # PIL's own PNG getexif() would decode the whole image to reach this chunk.
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("probe decoded pixel data"))
        probe = probe_image(path)
    assert probe.size == (20, 40) and probe.orientation == 8
    rgb, _ = load_image(path)
    assert rgb.shape == (40, 20, 3)
    assert rgb[35, 10, 0] == 255  # orientation 8 rotates counter-clockwise: the red left half ends at the bottom


# ----------------------------------------------------------------------------------------------------------------
# Modes

def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    probe = probe_image(path)
    assert probe.mode == "CMYK" and probe.size == (16, 8) and not probe.has_alpha
    rgb, alpha = load_image(path, with_alpha=True)
    assert rgb.shape == (8, 16, 3) and rgb.dtype == np.uint8
    assert rgb[4, 8, 0] > 240 and rgb[4, 8, 1] < 15 and rgb[4, 8, 2] < 15  # red
    assert alpha.dtype == np.float32 and np.all(alpha == 1.0)


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([10, 20, 30, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    probe = probe_image(path)
    assert probe.mode == "P" and probe.has_alpha
    rgb, alpha = load_image(path, with_alpha=True)
    assert rgb[0, 0].tolist() == [10, 20, 30]  # colour under the transparent pixel is kept, not composited
    assert rgb[0, 1].tolist() == [255, 0, 0]
    assert alpha[0, 0] == 0.0 and alpha[0, 1] == 1.0
    rgb_only, none = load_image(path)
    assert none is None and np.array_equal(rgb_only, rgb)


def test_grey_and_grey_alpha(tmp_path):
    Image.new("L", (3, 2), 100).save(tmp_path / "l.png")
    Image.new("LA", (3, 2), (100, 51)).save(tmp_path / "la.png")
    rgb, alpha = load_image(tmp_path / "l.png", with_alpha=True)
    assert rgb.shape == (2, 3, 3) and np.all(rgb == 100) and np.all(alpha == 1.0)
    assert not probe_image(tmp_path / "l.png").has_alpha
    rgb, alpha = load_image(tmp_path / "la.png", with_alpha=True)
    assert np.all(rgb == 100) and np.allclose(alpha, 51 / 255)
    assert probe_image(tmp_path / "la.png").has_alpha


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[65535, 32768, 0, 257, 1000]], np.uint16)).save(path)
    assert probe_image(path).mode.startswith("I")
    rgb, alpha = load_image(path, with_alpha=True)
    # round(v * 255 / 65535): 65535 -> 255, 32768 -> 128 (127.5 + 0.0019), 257 -> 1, 1000 -> 4 (3.89)
    assert rgb[0, :, 0].tolist() == [255, 128, 0, 1, 4]
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.all(alpha == 1.0)


def test_rgba_alpha_mask(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = [[0, 128, 255], [255, 255, 64]]
    path = tmp_path / "rgba.png"
    Image.fromarray(a).save(path)
    probe = probe_image(path)
    assert probe.mode == "RGBA" and probe.has_alpha and probe.format == "PNG"
    rgb, alpha = load_image(path, with_alpha=True)
    assert np.all(rgb[..., 0] == 200) and np.all(rgb[..., 1:] == 0)  # alpha dropped, not composited
    assert alpha.dtype == np.float32 and np.allclose(alpha, a[..., 3] / 255.0)
    assert load_image(path)[1] is None
    assert rgb.flags.writeable and rgb.flags.c_contiguous


def test_webp_and_bmp(tmp_path):
    _halves().save(tmp_path / "a.webp", "WEBP", lossless=True)
    _halves().convert("RGB").save(tmp_path / "a.bmp", "BMP")
    for name, fmt in [("a.webp", "WEBP"), ("a.bmp", "BMP")]:
        probe = probe_image(tmp_path / name)
        assert probe.format == fmt and probe.size == (40, 20)
        rgb, _ = load_image(tmp_path / name)
        assert rgb[10, 5].tolist() == [255, 0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Broken files

@pytest.fixture
def broken(tmp_path):
    """Four bad files and two good ones."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    png = png.getvalue()
    jpg = _noise_jpeg(tmp_path / "good.jpg").read_bytes()
    (tmp_path / "good.png").write_bytes(png)
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    return tmp_path


def test_each_bad_file_has_a_reason(broken):
    reasons = {
        "trunc.png": "truncated PNG",
        "trunc.jpg": "truncated JPEG",
        "empty.png": "empty file",
        "text.png": "not a supported image",
    }
    for name, reason in reasons.items():
        with pytest.raises(BadImageError, match=reason) as e:
            probe_image(broken / name)
        assert e.value.path == broken / name and reason in e.value.reason
        assert str(broken / name) in str(e.value)
    with pytest.raises(BadImageError, match="file not found"):
        probe_image(broken / "missing.png")
    with pytest.raises(BadImageError):
        load_image(broken / "text.png")


def test_png_missing_only_iend_is_truncated(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue()[:-12])
    with pytest.raises(BadImageError, match="truncated PNG"):
        probe_image(tmp_path / "x.png")


def test_jpeg_trailing_padding_and_appended_data_are_accepted(tmp_path):
    jpg = _noise_jpeg(tmp_path / "a.jpg", exif=_exif(1)).read_bytes()
    (tmp_path / "pad.jpg").write_bytes(jpg + b"\x00" * 5000)  # longer than the fast tail check
    (tmp_path / "appended.jpg").write_bytes(jpg + b"ftypmp42" + bytes(range(256)) * 10)
    assert probe_image(tmp_path / "pad.jpg").size == (96, 64)
    assert probe_image(tmp_path / "appended.jpg").size == (96, 64)


def test_truncated_webp_and_bmp(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, "WEBP", quality=80)
    (tmp_path / "t.webp").write_bytes(buf.getvalue()[:-40])
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "BMP")
    (tmp_path / "t.bmp").write_bytes(buf.getvalue()[:-100])
    with pytest.raises(BadImageError, match="truncated WebP"):
        probe_image(tmp_path / "t.webp")
    with pytest.raises(BadImageError, match="truncated BMP"):
        probe_image(tmp_path / "t.bmp")


def test_multi_picture_jpeg(tmp_path):
    """Phone JPEGs with an MPF index open as PIL format MPO; the first frame is the image."""
    _halves().save(tmp_path / "m.jpg", "MPO", save_all=True, append_images=[_halves(20, 20)])
    probe = probe_image(tmp_path / "m.jpg")
    assert probe.format == "MPO" and probe.size == (40, 20)
    assert load_image(tmp_path / "m.jpg")[0].shape == (20, 40, 3)


def test_probe_never_decodes_pixels(tmp_path, monkeypatch):
    _halves().save(tmp_path / "a.jpg", exif=_exif(6))
    _halves().save(tmp_path / "a.png")
    _halves().save(tmp_path / "a.webp", "WEBP")
    _halves().save(tmp_path / "a.bmp")
    Image.new("P", (4, 4)).save(tmp_path / "p.png", transparency=0)

    def no_decode(self):
        raise AssertionError("probe decoded pixel data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    good, bad = check_images(list_images(tmp_path))
    assert len(good) == 5 and not bad


def test_unsupported_format_is_rejected(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "gif.png", "GIF")
    with pytest.raises(BadImageError, match="not a supported image"):
        probe_image(tmp_path / "gif.png")


def test_check_images_lists_every_bad_file(broken):
    paths = sorted(broken.iterdir())
    with pytest.raises(BadImageError) as e:
        check_images(paths)
    bad = {b.path.name for b in e.value.bad_images}
    assert bad == {"trunc.png", "trunc.jpg", "empty.png", "text.png"}
    message = str(e.value)
    assert message.startswith("4 images cannot be used")
    for name in bad:
        assert name in message


def test_check_images_skip_bad_warns_and_keeps_good(broken, caplog):
    paths = sorted(broken.iterdir())
    with caplog.at_level(logging.WARNING, logger="library.data.images"):
        good, bad = check_images(paths, skip_bad=True)
    assert [p.path.name for p in good] == ["good.jpg", "good.png"]
    assert len(bad) == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and all("skipping image" in w for w in warned)
    # Thread-pool path gives the same answer in the same order.
    good_threads, bad_threads = check_images(paths * 20, skip_bad=True, num_threads=2)
    assert [p.path for p in good_threads] == [p.path for p in good] * 20 and len(bad_threads) == 80
