"""ExtraChannelsFlux: condition features concatenated to each noisy token (Fill, Canny/Depth, Flex.2)."""

import pytest
import torch

from library.models.conditioned import ExtraChannelsFlux
from library.models.packing import prepare_img_ids, prepare_txt_ids
from library.models.transformer import Flux, params_with_overrides


@pytest.fixture
def model(one_torch_thread):
    torch.manual_seed(0)
    return Flux(params_with_overrides("tiny", in_channels=128)).eval()


def inputs(n=16):
    torch.manual_seed(1)
    img, txt = torch.randn(2, n, 64), torch.randn(2, 5, params_with_overrides("tiny").context_in_dim)
    return img, prepare_img_ids(2, 4, n // 4), txt, prepare_txt_ids(2, 5), torch.tensor([0.3, 0.7]), None


def test_features_are_concatenated_per_call_or_bound(model):
    img, img_ids, txt, txt_ids, t, _ = inputs()
    y = torch.randn(2, model.params.vec_in_dim)
    g = torch.full((2,), 3.5)
    features = torch.randn(2, img.shape[1], 64)
    direct = model(torch.cat((img, features), -1), img_ids, txt, txt_ids, t, y, g)
    wrapped = ExtraChannelsFlux(model)
    assert wrapped.extra_channels == 64
    assert torch.equal(wrapped(img, img_ids, txt, txt_ids, t, y, g, extra_channels=features), direct)
    assert torch.equal(wrapped.bind(features)(img, img_ids, txt, txt_ids, t, y, g), direct)
    seen = []
    wrapped.bind(lambda timesteps, ids: seen.append(timesteps) or features)  # time-dependent conditions
    assert torch.equal(wrapped(img, img_ids, txt, txt_ids, t, y, g), direct) and torch.equal(seen[0], t)


def test_missing_or_misshaped_features_are_named(model):
    img, img_ids, txt, txt_ids, t, _ = inputs()
    y, g = torch.randn(2, model.params.vec_in_dim), torch.full((2,), 3.5)
    with pytest.raises(ValueError, match="takes 64 condition features per token"):
        ExtraChannelsFlux(model)(img, img_ids, txt, txt_ids, t, y, g)
    with pytest.raises(ValueError, match=r"expected \(B, 16, 64\)"):
        ExtraChannelsFlux(model)(img, img_ids, txt, txt_ids, t, y, g, extra_channels=torch.zeros(2, 16, 32))
