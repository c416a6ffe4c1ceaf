"""tools/quickstart_report.py on tiny inputs: result.png has one labelled row per training image and four panels,
loss.png is drawn from the trainer's --loss_csv."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from library.models.autoencoder import AE_PRESETS, AutoEncoder
from tools import quickstart_report as report


def test_report_writes_result_and_loss_pictures(tmp_path):
    torch.manual_seed(0)
    save_file(AutoEncoder(AE_PRESETS["tiny"]).state_dict(), str(tmp_path / "ae.safetensors"))
    images, samples = tmp_path / "images", tmp_path / "samples"
    images.mkdir()
    for stem in ("000_red_circle", "001_green_square"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(images / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"caption of {stem}\n")
        np.savez(images / f"{stem}_0064x0064_flux.npz", latents_8x8=np.zeros((16, 8, 8), np.float32))
        for variant, value in (("base", 1.0), ("lora", 0.1)):
            (samples / f"{stem}_{variant}").mkdir(parents=True)
            save_file({"latents": torch.full((1, 16, 8, 8), value)},
                      str(samples / f"{stem}_{variant}" / "x_latents.safetensors"))
    (tmp_path / "loss.csv").write_text("step,loss,lr\n" + "".join(f"{i},{1 / i},0.01\n" for i in range(1, 101)))

    written = report.make_report(images, samples, tmp_path / "ae.safetensors", tmp_path / "out", tmp_path / "loss.csv")

    result = Image.open(written["result"])
    row = report.TEXT + report.CELL + 2 * report.TEXT + report.PAD
    assert result.size == (report.PAD + 4 * (report.CELL + report.PAD), 2 * report.TEXT + report.PAD + 2 * row)
    assert Image.open(written["loss"]).size == (640, 360)
    # the training image is pasted as it is (upscaled) in the first panel of the first row
    x, y = report.PAD + report.CELL // 2, 2 * report.TEXT + report.PAD + report.TEXT + report.CELL // 2
    assert result.getpixel((x, y)) == (200, 30, 30)
