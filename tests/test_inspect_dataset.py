"""tools/inspect_dataset.py: report, JSON records and problem listing, through its command line."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT
from tools.inspect_dataset import main


def make_dataset(tmp_path, bad=False):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(120, 80), (80, 120), (100, 100)]):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(folder / f"i{i}.png")
        (folder / f"i{i}.caption").write_text(f"sks dog, tag{i}")
    if bad:
        (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    config = tmp_path / "d.toml"
    config.write_text(f'[general]\nenable_bucket = true\nresolution = 96\nmin_bucket_reso = 32\nmax_bucket_reso = 160\n'
                      f'bucket_reso_steps = 16\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\n'
                      f'image_dir = "{folder}"\nnum_repeats = 2\n')
    return config


def test_report_lists_buckets_steps_and_captions(tmp_path, capsys):
    config = make_dataset(tmp_path)
    assert main(["--dataset_config", str(config), "--max_train_epochs", "3", "--network_dim", "16"]) == 0
    out, err = capsys.readouterr()
    assert "3 images x 2 repeats" in out
    assert "batches per epoch: 3" in out and "max_train_steps 9 = 3 epoch(s)" in out
    assert "tags: 4 distinct" in out and "sks dog (3)" in out
    assert "--network_dim 16" in err and "no problems found" in err


def test_json_records(tmp_path, capsys):
    config = make_dataset(tmp_path)
    assert main(["--dataset_config", str(config), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    wide = next(r for r in records if r["path"].endswith("i0.png"))
    # 120x80 -> ar 1.5; closest bucket of area <= 96*96 in steps of 16: 112x80 (ar 1.4); cover scale 1.0
    assert wide["bucket"] == [112, 80] and wide["resized_size"] == [120, 80] and wide["crop_left_top"] == [4, 0]
    assert wide["caption"] == "sks dog, tag0" and wide["repeats"] == 2


def test_problems_are_listed_and_exit_status_is_1(tmp_path):
    config = make_dataset(tmp_path, bad=True)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_dataset.py"), "--dataset_config", str(config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "bad.jpg" in r.stderr and "1 problem(s)" in r.stderr
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text('[[datasets]]\nresolution = 64\ninterpolation_type = "lanczos"\n[[datasets.subsets]]\n'
                          'image_dir = "/nonexistent"\n')
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_dataset.py"), "--dataset_config",
                        str(bad_config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "interpolation_type" in r.stderr and "/nonexistent" in r.stderr
    assert "Traceback" not in r.stderr


def test_notes_are_listed_but_only_problems_fail(tmp_path, capsys):
    # sd-scripts' own example configs combine bucket_no_upscale with min/max_bucket_reso: a note, not a problem
    config = make_dataset(tmp_path)
    config.write_text(config.read_text().replace("enable_bucket = true\n", "enable_bucket = true\n"
                                                 "bucket_no_upscale = true\n"))
    assert main(["--dataset_config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "1 note(s):\n- min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale" in err
    assert "problem" not in err.replace("no problems found", "")
    # a note beside a problem: both listed, the problem fails the check
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    assert main(["--dataset_config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "1 note(s):" in err and "1 problem(s):" in err and "bad.jpg" in err.split("problem(s):")[1]
