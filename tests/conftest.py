import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_dir() -> Path:
    """shared/ sits beside the checkout (../shared), in CI as in development."""
    for base in (ROOT, *ROOT.parents):
        if (base / "shared" / "fixtures").is_dir():
            return base / "shared"
    pytest.skip("shared/fixtures not found beside the checkout")


def read_key_fixture(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (shared_dir() / "fixtures" / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
