import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from library.data.cache_common import FINGERPRINT_INDEX_ENV  # noqa: E402 (after the path insert)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# key/shape tables of the real model files, kept in the checkout: a test never reads outside the repository
FIXTURES = ROOT / "tests" / "fixtures"


def read_key_fixture(name: str) -> dict[str, tuple[int, ...]]:
    """A fixture's lines "key\t[d0, d1, ...]" as {key: shape}."""
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


@pytest.fixture(scope="session", autouse=True)
def _fingerprint_index(tmp_path_factory):
    """Model fingerprints are remembered in a file of the test session, not in the user's ~/.cache (subprocess runs
    inherit it through the environment)."""
    before = os.environ.get(FINGERPRINT_INDEX_ENV)
    os.environ[FINGERPRINT_INDEX_ENV] = str(tmp_path_factory.mktemp("fingerprints") / "fingerprints.json")
    yield
    if before is None:
        os.environ.pop(FINGERPRINT_INDEX_ENV, None)
    else:
        os.environ[FINGERPRINT_INDEX_ENV] = before


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # one intra-op thread: the tiny models gain nothing from more, and on a 2-core machine with any other process
    # running, two threads spin against it (a tiny step measured 10 s instead of 0.27 s)
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    """Tiny model files (tools/make_tiny_models.py) for the tests of one module."""
    from tools.make_tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def models(tiny_paths):
    """Fresh fp32 (flux, clip_l, t5xxl) per test, loaded from tiny_paths: tests hook and merge into them."""
    from library import flux_utils

    _, flux = flux_utils.load_flow_model(tiny_paths["flux"], torch.float32, "cpu")
    clip = flux_utils.load_clip_l(tiny_paths["clip_l"], torch.float32, "cpu")
    t5 = flux_utils.load_t5xxl(tiny_paths["t5xxl"], torch.float32, "cpu")
    return flux.eval(), clip.eval(), t5.eval()


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread is as fast, and two threads spin for seconds on a shared, busy 2-core CPU. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
