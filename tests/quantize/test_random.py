"""Random-code checkpoints whose router is skewed towards given routing shares."""

from __future__ import annotations

import pytest
import torch

from dbrxq.core.errors import DbrxqError
from dbrxq.formats.checkpoint import CheckpointReader
from dbrxq.formats.random import preset_config
from quantize.config import QuantConfig
from quantize.random import make_random_quantized_checkpoint, router_scales


def test_router_scales_reproduce_the_shares_on_fresh_tokens():
    shares = [0.11, 0.11, 0.1, 0.09, 0.08, 0.07, 0.07, 0.06, 0.06, 0.05, 0.05, 0.04, 0.04, 0.03, 0.02, 0.02]
    a = torch.tensor(router_scales(shares, 4, seed=0))
    z = torch.randn(40000, 16, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ids = (z * a.double()).topk(4, dim=1).indices
    got = torch.bincount(ids.reshape(-1), minlength=16).double() / ids.numel()
    target = torch.tensor(shares, dtype=torch.float64) / sum(shares)
    # the fit sees 20,000 simulated tokens and this check 40,000 fresh ones: a share of ~0.1 carries a
    # sampling error of about sqrt(0.1 / 80,000) ~ 0.0011 in the fit and 0.0008 here; 0.006 is ~3x
    # the two together (a fit that did nothing misses by 0.05)
    assert (got - target).abs().max() < 0.006, (got, target)
    # one expert's share cannot pass 1/(2 top_k) this way (a zero-mean logit is above the others at most
    # half the time, however wide): asked for more, it gets close to that
    capped = router_scales([0.3] + [0.7 / 15] * 15, 4, seed=0)
    assert max(capped) == capped[0]
    uniform = torch.tensor(router_scales([1.0] * 16, 4, seed=0))
    assert (uniform - 1).abs().max() < 0.1  # no skew asked, none made


def test_checkpoint_router_rows_are_scaled_and_the_rest_unchanged(tmp_path):
    config = preset_config("tiny", n_layers=2, d_model=128, ffn_hidden_size=128)
    shares = [[float(16 - e) for e in range(16)]]
    plain = make_random_quantized_checkpoint(tmp_path / "a", config, QuantConfig(), progress=False)
    skewed = make_random_quantized_checkpoint(tmp_path / "b", config, QuantConfig(), progress=False,
                                              router_shares=shares)
    scales = sorted(router_scales([s / sum(shares[0]) for s in shares[0]], config.top_k, seed=0))
    with CheckpointReader(plain) as a, CheckpointReader(skewed) as b:
        assert a.keys() == b.keys()
        for name in a.keys():
            x, y = a.get(name), b.get(name)
            if name.endswith("ffn.router.layer.weight"):
                ratio = y.float().norm(dim=1) / x.float().norm(dim=1)
                assert torch.allclose(ratio.sort().values, torch.tensor(scales), rtol=1e-2), name
            else:
                assert torch.equal(x, y), name


@pytest.mark.parametrize("shares", [[], [[1.0] * 15], [[1.0] * 15 + [float("nan")]], [[0.0] * 16],
                                    [[1.0] * 15 + [-1.0]], [[True] * 16], {"0": [1.0] * 16}])
def test_bad_router_shares_are_refused(tmp_path, shares):
    with pytest.raises(DbrxqError, match="router shares"):
        make_random_quantized_checkpoint(tmp_path / "c", preset_config("tiny", d_model=128, ffn_hidden_size=128), QuantConfig(), progress=False,
                                         router_shares=shares)
    assert not (tmp_path / "c").exists()
