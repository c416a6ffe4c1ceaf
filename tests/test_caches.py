"""Latent and text-encoder caches: sd-scripts' file layout both ways, provenance and staleness, atomic writes,
work split between processes, RAM mode (CPU, fp32, tiny models)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from library.data import cache_common
from library import flux_utils
from library.data.cache_common import CacheError, model_file_identity, npz_index, process_share
from library.data.latent_cache import LatentCache, encode_latents, latent_seed, latents_npz_path
from library.data.text_encoder_cache import TextEncoderCache, stack_outputs, te_npz_path, text_encoder_identity
from library.models.text_encoding import FluxTokenizer, caption_encoder, encode_prompts
from tools.make_tiny_models import make_tiny_models

T5_LEN = 16


@dataclass(frozen=True)
class Item:
    """A dataset item as the caches see it (the protocol in library.data.cache_common)."""

    absolute_path: Path
    image_size: tuple[int, int] = (100, 70)
    bucket_reso: tuple[int, int] = (64, 48)
    flip_aug: bool = False
    alpha_mask: bool = False
    te_caption: str = "a photo of a cat"
    resize_interpolation: str | None = None
    relative_path: str | None = None


def load_pixels(item):
    """Deterministic pixels per image and bucket; an alpha channel when the item asks for one."""
    w, h = item.bucket_reso
    seed = int.from_bytes(hashlib.sha256(f"{item.absolute_path}{w}{h}".encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.random((h, w), dtype=np.float32) if item.alpha_mask else None
    return rgb, alpha, (0, 2, w, h - 2)


def pixels_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("tiny"))
    ae = flux_utils.load_ae(paths["ae"], torch.float32, "cpu").eval()
    clip_l = flux_utils.load_clip_l(paths["clip_l"], torch.float32, "cpu").eval()
    t5 = flux_utils.load_t5xxl(paths["t5xxl"], torch.float32, "cpu").eval()
    tok = flux_utils.load_tokenizer(tokenizer_cache_dir=paths["tokenizers"], t5xxl_max_token_length=T5_LEN)
    return paths, ae, clip_l, t5, tok


@pytest.fixture
def ae_counter(models):
    """Counts images through the AE encoder (both encode paths run it)."""
    ae = models[1]
    seen = []
    handle = ae.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    yield ae, seen
    handle.remove()


@pytest.fixture
def te_counter(models):
    t5 = models[3]
    seen = []
    handle = t5.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    yield seen
    handle.remove()


def images(tmp_path, n, **kw) -> list[Item]:
    return [Item(tmp_path / f"img{i}.png", **kw) for i in range(n)]


def run_latents(cache, items, ae, **kw) -> int:
    return cache.cache(items, ae, load_pixels, "cpu", torch.float32, **kw)


# ----------------------------------------------------------------------------------------------------------------
# latents: layout and interop


def test_latent_file_layout_is_sd_scripts(tmp_path, models):
    ae = models[1]
    item = Item(tmp_path / "photo.jpg", flip_aug=True, alpha_mask=True)
    LatentCache(True, "ae:1", sample=False).cache([item], ae, load_pixels, "cpu", torch.float32, progress=False)
    path = tmp_path / "photo_0100x0070_flux.npz"
    assert latents_npz_path(item.absolute_path, item.image_size) == path and path.exists()
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    with np.load(path, allow_pickle=False) as z:  # everything loads without pickle
        got = {k: z[k] for k in z.files}
    assert set(got) == {"latents_6x8", "latents_flipped_6x8", "original_size_6x8", "crop_ltrb_6x8",
                        "alpha_mask_6x8", "flux_suite_meta_6x8"}
    assert got["latents_6x8"].dtype == np.float32 and got["latents_6x8"].shape == (16, 6, 8)
    assert got["latents_flipped_6x8"].dtype == np.float32 and got["latents_flipped_6x8"].shape == (16, 6, 8)
    assert got["alpha_mask_6x8"].dtype == np.float32 and got["alpha_mask_6x8"].shape == (48, 64)
    assert got["original_size_6x8"].tolist() == [100, 70] and got["original_size_6x8"].dtype.kind == "i"
    assert got["crop_ltrb_6x8"].tolist() == [0, 2, 64, 46] and got["crop_ltrb_6x8"].dtype.kind == "i"
    assert got["flux_suite_meta_6x8"].dtype.kind == "U" and got["flux_suite_meta_6x8"].shape == ()
    meta = cache_common.meta_from_array(got["flux_suite_meta_6x8"])
    assert meta["ae"] == "ae:1" and meta["bucket_reso"] == [64, 48] and meta["flip"] and meta["alpha_mask"]
    assert meta["posterior"] == "mean" and meta["crop_ltrb"] == [0, 2, 64, 46]
    assert meta["format"] == cache_common.FORMAT_VERSION

    rgb, alpha, _ = load_pixels(item)
    expected = ae.encode(pixels_tensor(rgb))[0]
    torch.testing.assert_close(torch.from_numpy(got["latents_6x8"]), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got["alpha_mask_6x8"], alpha)
    entry = LatentCache(True, "ae:1", sample=False).get(item)
    assert torch.equal(entry.latents, torch.from_numpy(got["latents_6x8"]))
    assert torch.equal(entry.latents_flipped, torch.from_numpy(got["latents_flipped_6x8"]))
    assert entry.original_size.tolist() == [100, 70] and entry.crop_ltrb.tolist() == [0, 2, 64, 46]
    # an item without flip / mask gets neither
    plain = LatentCache(True, "ae:1", sample=False).get(replace(item, flip_aug=False, alpha_mask=False))
    assert plain.latents_flipped is None and plain.alpha_mask is None


def test_flipped_latents_encode_the_flipped_image(tmp_path, models):
    ae = models[1]
    item = Item(tmp_path / "a.png", flip_aug=True)
    cache = LatentCache(False, "ae", sample=False)
    cache.cache([item], ae, load_pixels, "cpu", torch.float32, progress=False)
    rgb = load_pixels(item)[0]
    flipped = ae.encode(pixels_tensor(np.ascontiguousarray(rgb[:, ::-1])))[0]
    torch.testing.assert_close(cache.get(item).latents_flipped, flipped, atol=1e-5, rtol=1e-5)


def test_resolutions_accumulate_in_one_file(tmp_path, ae_counter):
    ae, seen = ae_counter
    small, large = Item(tmp_path / "a.png"), Item(tmp_path / "a.png", bucket_reso=(96, 64))
    cache = LatentCache(True, "ae")
    assert run_latents(cache, [small], ae) == 1
    assert run_latents(cache, [large], ae) == 1
    keys = set(npz_index(tmp_path / "a_0100x0070_flux.npz"))
    assert {"latents_6x8", "latents_8x12", "flux_suite_meta_6x8", "flux_suite_meta_8x12"} <= keys
    assert run_latents(cache, [small, large], ae) == 0 and sum(seen) == 2
    assert cache.get(large).latents.shape == (16, 8, 12) and cache.get(small).latents.shape == (16, 6, 8)


def _write_sd_scripts_latents(item: Item, flip=False, channels=16):
    """An npz as sd-scripts writes it: its keys only, no provenance."""
    w, h = item.bucket_reso
    s = f"_{h // 8}x{w // 8}"
    arrays = {"latents" + s: np.full((channels, h // 8, w // 8), 0.25, np.float32),
              "original_size" + s: np.array(item.image_size), "crop_ltrb" + s: np.array([0, 0, w, h])}
    if flip:
        arrays["latents_flipped" + s] = np.full((channels, h // 8, w // 8), -0.25, np.float32)
    path = latents_npz_path(item.absolute_path, item.image_size)
    np.savez(path, **arrays)
    return path


def test_sd_scripts_latent_files_are_used_with_one_warning(tmp_path, ae_counter, caplog):
    ae, seen = ae_counter
    items = images(tmp_path, 3, flip_aug=True)
    for it in items[:2]:
        _write_sd_scripts_latents(it, flip=True)
    _write_sd_scripts_latents(items[2], flip=False)  # lacks the flipped latents this item needs
    cache = LatentCache(True, "ae")
    with caplog.at_level(logging.WARNING):
        assert run_latents(cache, items, ae) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 file(s)" in warnings[0].getMessage() and "delete" in warnings[0].getMessage()
    assert sum(seen) == 2  # the third image and its flip
    entry = cache.get(items[0])
    assert torch.all(entry.latents == 0.25) and torch.all(entry.latents_flipped == -0.25)
    assert not torch.all(cache.get(items[2]).latents == 0.25)
    # refusing foreign files rebuilds them
    assert run_latents(LatentCache(True, "ae", trust_foreign=False), items, ae) == 2


def test_sd_scripts_latent_file_of_wrong_shape_is_recomputed(tmp_path, ae_counter):
    ae, _ = ae_counter
    item = Item(tmp_path / "a.png")
    _write_sd_scripts_latents(item, channels=4)
    assert run_latents(LatentCache(True, "ae"), [item], ae) == 1


# ----------------------------------------------------------------------------------------------------------------
# latents: staleness


@pytest.mark.parametrize("change", ["ae", "bucket", "flip", "alpha", "mean", "interpolation", "image_file"])
def test_changed_latent_settings_recompute(tmp_path, ae_counter, change):
    ae, seen = ae_counter
    item = Item(tmp_path / "a.png")
    item.absolute_path.write_bytes(b"image v1")
    assert run_latents(LatentCache(True, "ae:1"), [item], ae) == 1
    assert run_latents(LatentCache(True, "ae:1"), [item], ae) == 0  # unchanged: nothing to do
    cache = LatentCache(True, "ae:2" if change == "ae" else "ae:1", sample=change != "mean")
    new = {"bucket": replace(item, bucket_reso=(48, 64)), "flip": replace(item, flip_aug=True),
           "alpha": replace(item, alpha_mask=True),
           "interpolation": replace(item, resize_interpolation="lanczos")}.get(change, item)
    if change == "image_file":
        item.absolute_path.write_bytes(b"image v2, edited")
    assert not cache.is_valid(new)
    assert run_latents(cache, [new], ae) == 1 and cache.is_valid(new)
    assert sum(seen) == 2 + (change == "flip")
    # skip_cache_check trusts any existing file
    trusting = LatentCache(True, "something else", skip_cache_check=True)
    assert trusting.is_valid(replace(new, flip_aug=True)) and run_latents(trusting, [new], ae) == 0


def test_stored_flip_and_mask_serve_items_without_them(tmp_path, ae_counter):
    ae, seen = ae_counter
    item = Item(tmp_path / "a.png", flip_aug=True, alpha_mask=True)
    run_latents(LatentCache(True, "ae"), [item], ae)
    assert run_latents(LatentCache(True, "ae"), [replace(item, flip_aug=False, alpha_mask=False)], ae) == 0


def test_one_entry_for_items_sharing_it(tmp_path, ae_counter):
    ae, seen = ae_counter
    item = Item(tmp_path / "a.png")
    both = [item, replace(item, flip_aug=True), replace(item, alpha_mask=True)]
    cache = LatentCache(True, "ae", batch_size=4)
    assert run_latents(cache, both, ae) == 1 and sum(seen) == 2  # one image and its flip
    assert all(cache.is_valid(it) for it in both)
    with pytest.raises(CacheError, match="different settings"):
        run_latents(cache, [item, replace(item, resize_interpolation="area")], ae)


def test_sampled_latents_are_seeded_per_image(tmp_path, models):
    ae = models[1]
    items = images(tmp_path, 3, flip_aug=True)
    one, three = LatentCache(False, "ae", batch_size=1), LatentCache(False, "ae", batch_size=3)
    run_latents(one, items, ae, progress=False)
    run_latents(three, items, ae, progress=False)
    for it in items:
        assert torch.equal(one.get(it).latents, three.get(it).latents)
    rgb = load_pixels(items[1])[0]
    g = torch.Generator().manual_seed(latent_seed(items[1]))
    expected = ae.encode(pixels_tensor(rgb), sample=True, generator=g)[0]
    expected_flip = ae.encode(pixels_tensor(np.ascontiguousarray(rgb[:, ::-1])), sample=True, generator=g)[0]
    torch.testing.assert_close(three.get(items[1]).latents, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(three.get(items[1]).latents_flipped, expected_flip, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, ae.encode(pixels_tensor(rgb))[0])  # it is a sample, not the mean
    x = torch.cat([pixels_tensor(rgb)] * 2)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert not torch.equal(*encode_latents(ae, x, gens))


def test_sampled_latents_follow_the_relative_path_not_the_folder(tmp_path, models):
    """A dataset moved to another folder gets the same latents (issue 14, defect 9): the seed is the path relative
    to the dataset root."""
    ae = models[1]
    here = Item(tmp_path / "a" / "sub" / "x.png", relative_path="sub/x.png")
    there = Item(tmp_path / "b" / "sub" / "x.png", relative_path="sub/x.png")
    cache = LatentCache(False, "ae")

    def pixels(item):  # the same image in both folders
        return load_pixels(Item(Path("x.png")))

    cache.cache([here, there], ae, pixels, "cpu", torch.float32, progress=False)
    assert torch.equal(cache.get(here).latents, cache.get(there).latents)
    assert latent_seed(here) != latent_seed(replace(here, relative_path="other/x.png"))


def test_memory_mode(tmp_path, ae_counter):
    ae, seen = ae_counter
    items = images(tmp_path, 3, alpha_mask=True) + [Item(tmp_path / "big.png", bucket_reso=(96, 64))]
    cache = LatentCache(False, "ae", batch_size=2)
    assert run_latents(cache, items, ae, progress=False) == 4
    assert os.listdir(tmp_path) == []  # nothing written
    assert run_latents(cache, items, ae) == 0 and sum(seen) == 4
    assert cache.get(items[0]).alpha_mask.shape == (48, 64) and cache.get(items[3]).latents.shape == (16, 8, 12)
    with pytest.raises(CacheError, match="latents_6x8"):
        LatentCache(False, "ae").get(items[0])


def test_missing_latents_raise_naming_file_and_key(tmp_path, models):
    item = Item(tmp_path / "a.png")
    cache = LatentCache(True, "ae")
    with pytest.raises(CacheError, match="a_0100x0070_flux.npz"):
        cache.get(item)
    run_latents(cache, [item], models[1])
    with pytest.raises(ValueError, match=r"a_0100x0070_flux\.npz.*latents_flipped_6x8"):
        cache.get(replace(item, flip_aug=True))


def test_rank_split_caches_each_entry_once(tmp_path, ae_counter):
    ae, seen = ae_counter
    items = images(tmp_path, 5) + [Item(tmp_path / "img0.png", bucket_reso=(96, 64))]  # img0 twice
    waits = []
    counts = [run_latents(LatentCache(True, "ae", batch_size=2), items, ae, process_index=r, num_processes=2,
                          wait_for_everyone=lambda r=r: waits.append(r)) for r in (0, 1)]
    assert sum(counts) == 6 and sum(seen) == 6 and waits == [0, 1]
    assert counts == [4, 2]  # files img0 (both resolutions), img2, img4 | img1, img3
    assert all(LatentCache(True, "ae").is_valid(it) for it in items)
    assert process_share(["a", "b", "a", "c"], 0, 2) == [0, 2, 3] and process_share(["a", "b"], 1, 2) == [1]


# ----------------------------------------------------------------------------------------------------------------
# atomic writes and identities


def test_failed_write_keeps_the_old_file(tmp_path, models, monkeypatch):
    item = Item(tmp_path / "a.png")
    run_latents(LatentCache(True, "ae:1"), [item], models[1])
    path = latents_npz_path(item.absolute_path, item.image_size)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cache_common.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        run_latents(LatentCache(True, "ae:2"), [item], models[1])
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_model_file_identity(tmp_path, models):
    paths = models[0]
    ident = model_file_identity(paths["ae"])
    assert ident.startswith("ae.safetensors:") and len(ident.split(":")[1]) == 16
    assert model_file_identity(paths["ae"]) == ident != model_file_identity(paths["clip_l"])
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "ae.safetensors")
    assert model_file_identity(tmp_path / "ae.safetensors") != ident
    te = text_encoder_identity(paths["clip_l"], paths["t5xxl"], torch.bfloat16)
    assert te == {"clip_l": model_file_identity(paths["clip_l"]), "t5xxl": model_file_identity(paths["t5xxl"]),
                  "dtype": "bfloat16"}
    assert TextEncoderCache(True, {"versions": (1, 2)}).identity == {"versions": [1, 2]}


def _same_header_variant(src: Path, dst: Path) -> None:
    """A copy of a safetensors file with the same name, size and header but other weights (another fine-tune)."""
    data = bytearray(src.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(b ^ 0x5A for b in data[start:])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def _bump_mtime(path: Path) -> None:
    """A replaced file has its own mtime; set one clearly apart from the old (file systems tick coarsely)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_same_size_image_edit_recomputes_latents(tmp_path, ae_counter):
    ae, seen = ae_counter
    image = tmp_path / "a.png"
    image.write_bytes(b"first version " * 10)
    item = Item(image)
    cache = LatentCache(True, "ae")
    assert run_latents(cache, [item], ae) == 1 and run_latents(cache, [item], ae) == 0
    st = image.stat()
    image.write_bytes(b"other version " * 10)  # same size, and the same mtime as before
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_latents(cache, [item], ae) == 1 and cache.is_valid(item)
    assert run_latents(LatentCache(True, "ae", skip_cache_check=True), [item], ae) == 0
    meta = cache_common.meta_from_array(np.load(cache.npz_path(item))["flux_suite_meta_6x8"])
    assert meta["image_hash"] == cache_common.file_content_hash(image)


@pytest.mark.parametrize("where", ["other folder", "replaced in place"])
def test_other_ae_with_same_name_size_and_header_recomputes_latents(tmp_path, models, ae_counter, where):
    ae, seen = ae_counter
    first = tmp_path / "models" / "ae.safetensors"
    first.parent.mkdir()
    first.write_bytes(Path(models[0]["ae"]).read_bytes())
    item = Item(tmp_path / "img.png")
    assert run_latents(LatentCache(True, model_file_identity(first)), [item], ae) == 1
    assert run_latents(LatentCache(True, model_file_identity(first)), [item], ae) == 0
    second = tmp_path / "other" / "ae.safetensors" if where == "other folder" else first
    _same_header_variant(Path(models[0]["ae"]), second)
    _bump_mtime(second)
    assert second.stat().st_size == first.stat().st_size and second.name == first.name
    assert run_latents(LatentCache(True, model_file_identity(second)), [item], ae) == 1


@pytest.mark.parametrize("which", ["clip_l", "t5xxl"])
def test_other_text_encoder_with_same_name_size_and_header_recomputes(tmp_path, models, te_counter, which):
    paths = {k: tmp_path / k / Path(models[0][k]).name for k in ("clip_l", "t5xxl")}
    for k, dst in paths.items():
        dst.parent.mkdir()
        dst.write_bytes(Path(models[0][k]).read_bytes())
    item = Item(tmp_path / "img.png")
    ident = text_encoder_identity(paths["clip_l"], paths["t5xxl"], "fp32")
    assert run_te(te_cache(models, identity=ident), [item], models) == 1
    assert run_te(te_cache(models, identity=text_encoder_identity(paths["clip_l"], paths["t5xxl"], "fp32")),
                  [item], models) == 0
    _same_header_variant(Path(models[0][which]), paths[which])
    _bump_mtime(paths[which])
    changed = text_encoder_identity(paths["clip_l"], paths["t5xxl"], "fp32")
    other = {"clip_l": "t5xxl", "t5xxl": "clip_l"}[which]
    assert changed[which] != ident[which] and changed[other] == ident[other]
    assert run_te(te_cache(models, identity=changed), [item], models) == 1


def test_model_fingerprints_are_remembered(tmp_path, models, monkeypatch):
    """Unchanged model files are not read again (path + size + mtime + ctime + inode), also in a new process."""
    index = tmp_path / "index" / "fingerprints.json"
    monkeypatch.setenv(cache_common.FINGERPRINT_INDEX_ENV, str(index))
    reads = []
    real = cache_common._sampled_digest
    monkeypatch.setattr(cache_common, "_sampled_digest", lambda path, size: reads.append(path) or real(path, size))
    ae = tmp_path / "ae.safetensors"
    ae.write_bytes(Path(models[0]["ae"]).read_bytes())
    ident = model_file_identity(ae)
    assert len(reads) == 1 and index.exists()
    assert model_file_identity(ae) == ident and len(reads) == 1  # remembered: no data read
    assert str(ae.resolve()) in json.loads(index.read_text())
    _bump_mtime(ae)  # touched: read again, same content, same identity
    assert model_file_identity(ae) == ident and len(reads) == 2
    index.write_text("not json")  # a damaged index is rebuilt
    assert model_file_identity(ae) == ident and len(reads) == 3 and json.loads(index.read_text())


def test_large_weights_are_sampled(tmp_path, monkeypatch):
    """Past SAMPLE_CHUNK * SAMPLE_CHUNKS data bytes only strided chunks are read: a change inside one (first, middle,
    last) changes the fingerprint; a change between them is, as documented, not seen."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(cache_common, "SAMPLE_CHUNK", 16)
    monkeypatch.setattr(cache_common, "SAMPLE_CHUNKS", 5)  # chunks at 0, 246, 492, 738, 984 of 1000 data bytes
    path = tmp_path / "big.safetensors"
    save_file({"w": np.arange(1000, dtype=np.uint8)}, str(path))
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    base = cache_common._sampled_digest(path, len(data))
    for offset, seen in ((0, True), (500, True), (999, True), (100, False)):
        changed = bytearray(data)
        changed[start + offset] ^= 1
        path.write_bytes(bytes(changed))
        assert (cache_common._sampled_digest(path, len(data)) != base) == seen, offset


# ----------------------------------------------------------------------------------------------------------------
# text-encoder outputs


def te_cache(models, **kw) -> TextEncoderCache:
    kw.setdefault("t5_max_length", T5_LEN)
    return TextEncoderCache(kw.pop("cache_to_disk", True), kw.pop("identity", {"clip_l": "c", "t5xxl": "t"}), **kw)


def run_te(cache, items, models, tokenizer=None, **kw) -> int:
    _, _, clip_l, t5, tok = models
    return cache.cache(items, caption_encoder(tokenizer or tok, clip_l, t5, cache.apply_t5_attn_mask), **kw)


@pytest.mark.parametrize("mask", [False, True])
def test_te_file_layout_and_values(tmp_path, models, mask):
    _, _, clip_l, t5, tok = models
    items = [Item(tmp_path / "a.png", te_caption="a cat"), Item(tmp_path / "b.png", te_caption="a red dog, running")]
    run_te(te_cache(models, apply_t5_attn_mask=mask, batch_size=2), items, models, progress=False)
    assert te_npz_path(items[0].absolute_path) == tmp_path / "a_flux_te.npz"
    assert sorted(os.listdir(tmp_path)) == ["a_flux_te.npz", "b_flux_te.npz"]
    with torch.no_grad():
        direct = encode_prompts(clip_l, t5, *tok(["a cat", "a red dog, running"]), apply_t5_attn_mask=mask)
    for i, it in enumerate(items):
        with np.load(te_npz_path(it.absolute_path), allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
        assert set(got) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask", "flux_suite_meta"}
        assert got["l_pooled"].dtype == np.float32 and got["l_pooled"].shape == (clip_l.config.hidden_size,)
        assert got["t5_out"].dtype == np.float32 and got["t5_out"].shape == (T5_LEN, t5.config.d_model)
        assert got["txt_ids"].dtype == np.float32 and got["txt_ids"].shape == (T5_LEN, 3) and not got["txt_ids"].any()
        assert got["t5_attn_mask"].dtype == np.int64 and got["t5_attn_mask"].shape == (T5_LEN,)
        assert got["apply_t5_attn_mask"].dtype == np.bool_ and got["apply_t5_attn_mask"].shape == ()
        assert bool(got["apply_t5_attn_mask"]) is mask
        meta = cache_common.meta_from_array(got["flux_suite_meta"])
        assert meta["caption"] == it.te_caption and meta["t5_max_length"] == T5_LEN
        assert meta["apply_t5_attn_mask"] is mask and meta["encoders"] == {"clip_l": "c", "t5xxl": "t"}
        for name, value, ref in zip(("l_pooled", "t5_out", "txt_ids", "t5_attn_mask"),
                                    te_cache(models, apply_t5_attn_mask=mask).get(it), direct):
            torch.testing.assert_close(value, ref[i], atol=1e-5, rtol=1e-5, msg=name)


def test_te_memory_mode(tmp_path, models, te_counter):
    items = [Item(tmp_path / "a.png", te_caption="a cat"), Item(tmp_path / "a.png", te_caption="a dog")]
    cache = te_cache(models, cache_to_disk=False, batch_size=2)
    assert run_te(cache, items, models) == 2 and run_te(cache, items, models) == 0 and sum(te_counter) == 2
    assert os.listdir(tmp_path) == []
    assert not torch.equal(cache.get(items[0])[1], cache.get(items[1])[1])
    assert isinstance(cache.get(items[0])[0], torch.Tensor)
    with pytest.raises(CacheError, match="two captions"):  # one file cannot hold both
        run_te(te_cache(models), items, models)


@pytest.mark.parametrize("change", ["caption", "t5_length", "mask", "identity"])
def test_changed_te_settings_recompute(tmp_path, models, te_counter, change):
    item = Item(tmp_path / "a.png", te_caption="a cat")
    assert run_te(te_cache(models), [item], models) == 1
    assert run_te(te_cache(models), [item], models) == 0
    kw, tokenizer = {}, None
    if change == "t5_length":
        kw["t5_max_length"] = 24
        tokenizer = FluxTokenizer(models[4].clip_tokenizer, models[4].t5_tokenizer, 24)
    if change == "mask":
        kw["apply_t5_attn_mask"] = True
    if change == "identity":
        kw["identity"] = {"clip_l": "c", "t5xxl": "t5 v2"}
    new = replace(item, te_caption="a dog") if change == "caption" else item
    cache = te_cache(models, **kw)
    assert not cache.is_valid(new)
    assert run_te(cache, [new], models, tokenizer) == 1 and cache.is_valid(new) and sum(te_counter) == 2
    assert cache.get(new)[1].shape[0] == kw.get("t5_max_length", T5_LEN)
    trusting = te_cache(models, identity={"other": 1}, skip_cache_check=True)
    assert trusting.is_valid(replace(item, te_caption="x")) and run_te(trusting, [item], models) == 0


def test_sd_scripts_te_files(tmp_path, models, te_counter, caplog):
    items = [Item(tmp_path / f"{n}.png") for n in ("ok1", "ok2", "mask", "length", "keys")]
    for it in items:
        length = T5_LEN + 8 if it.absolute_path.stem == "length" else T5_LEN
        arrays = {"l_pooled": np.ones(32, np.float32), "t5_out": np.ones((length, 32), np.float32),
                  "txt_ids": np.zeros((length, 3), np.float32), "t5_attn_mask": np.ones(length, np.int64),
                  "apply_t5_attn_mask": np.array(it.absolute_path.stem == "mask")}
        if it.absolute_path.stem == "keys":
            del arrays["txt_ids"]
        np.savez(te_npz_path(it.absolute_path), **arrays)
    cache = te_cache(models, batch_size=8)
    with caplog.at_level(logging.WARNING):
        assert run_te(cache, items, models) == 3  # mask flag, length and missing key do not fit
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 file(s)" in warnings[0].getMessage()
    assert torch.all(cache.get(items[0])[1] == 1)
    assert sum(te_counter) == 3


def test_te_rank_split(tmp_path, models, te_counter):
    items = [Item(tmp_path / f"{i}.png", te_caption=f"caption {i}") for i in range(5)]
    counts = [run_te(te_cache(models, batch_size=2), items, models, process_index=r, num_processes=2)
              for r in (0, 1)]
    assert counts == [3, 2] and sum(te_counter) == 5
    assert all(te_cache(models).is_valid(it) for it in items)


def test_stack_pads_token_lengths():
    a = (torch.ones(4), torch.ones(3, 5), torch.zeros(3, 3), torch.ones(3, dtype=torch.long))
    b = (torch.ones(4), torch.ones(5, 5), torch.zeros(5, 3), torch.ones(5, dtype=torch.long))
    pooled, t5_out, txt_ids, mask = stack_outputs([a, b])
    assert pooled.shape == (2, 4) and t5_out.shape == (2, 5, 5) and txt_ids.shape == (2, 5, 3)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5] and t5_out[0, 3:].abs().sum() == 0
    assert TextEncoderCache.stack([a, a])[1].shape == (2, 3, 5)
    assert stack_outputs([(None, a[1]), (None, a[1])])[0] is None


def test_progress_bar_on_and_off(tmp_path, models, capsys):
    items = images(tmp_path, 2)
    run_latents(LatentCache(True, "ae"), items, models[1], progress=False)
    run_latents(LatentCache(False, "ae"), items, models[1], process_index=1)  # not the main process: silent
    assert "caching latents" not in capsys.readouterr().err
    run_latents(LatentCache(False, "ae"), items, models[1], progress=True)
    assert "caching latents" in capsys.readouterr().err
    run_te(te_cache(models), items, models, progress=False)
    assert "caching" not in capsys.readouterr().err
