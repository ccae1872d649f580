"""Clip modes (agent.clip.mode): each mode's limit against an independent computation, the after <= limit-used
invariant in every mode, null meaning off in every mode, and the adaptive state surviving a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from av_td3.agent.clipping import FixedNorm, NoClip, Percentile, ZScore, make_limit
from av_td3.config import ClipConfig
from tests.test_td3 import make_agent, make_batch

CPU = torch.device("cpu")


def _limits(limit, norms: list[float]) -> list[float]:
    out = []
    for n in norms:
        value = limit(torch.tensor(n))
        out.append(float(value))
    return out


def test_percentile_limit_is_autoclips_percentile_of_the_recent_norms() -> None:
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0.0, 1.0, 60))
    got = _limits(Percentile(7.0, percentile=90.0, window=20, warmup=5, device=CPU), norms)
    assert got[:5] == [7.0] * 5  # the fixed limit while the history fills
    for t in range(5, 60):  # the current norm included, the last `window` norms only
        assert got[t] == pytest.approx(np.percentile(norms[max(0, t - 19):t + 1], 90), rel=1e-5)


def test_zscore_limit_follows_the_zclip_recursion() -> None:
    rng = np.random.default_rng(1)
    norms = list(rng.normal(10.0, 1.0, 80))
    norms[50] = 100.0  # a spike: clipped, and fed to the statistics as clipped
    got = _limits(ZScore(3.0, z=2.5, ema=0.9, warmup=10, device=CPU), norms)
    assert got[:10] == [3.0] * 10
    mean, var = np.mean(norms[:10]), np.var(norms[:10])
    for t in range(10, 80):
        limit = mean + 2.5 * np.sqrt(var)
        assert got[t] == pytest.approx(limit, rel=1e-4)
        x = min(norms[t], limit)
        delta = x - mean
        mean += 0.1 * delta
        var = 0.9 * (var + 0.1 * delta * delta)
    assert got[51] < 20.0  # the spike did not drag the limit up


def test_null_means_off_and_norm_is_the_fixed_limit_in_every_mode() -> None:
    for mode in ("norm", "adaptive", "zscore"):
        assert isinstance(make_limit(ClipConfig(mode=mode, actor=None), "actor", CPU), NoClip)
    assert make_limit(ClipConfig(mode="norm", critic=4.0), "critic", CPU)(torch.tensor(99.0)) == 4.0
    assert isinstance(make_limit(ClipConfig(mode="norm"), "critic", CPU), FixedNorm)


@pytest.mark.parametrize("mode", ["adaptive", "zscore"])
def test_every_mode_holds_after_clip_below_the_limit_used_and_logs_it(mode: str) -> None:
    agent = make_agent(policy_freq=1, **{"clip.mode": mode, "clip.warmup": 3,
                                          "clip.percentile": 50.0})
    for i in range(12):
        agent.update(make_batch(i, reward_scale=1.0 + 20.0 * (i == 9)), step=i)
    s = agent.monitor.flush(12).scalars
    for net in ("actor", "critic"):
        assert s[f"grad/{net}/after_over_limit_max"] <= 1.0 + 1e-6
        assert s[f"grad/{net}/total/after_clip_max"] <= s[f"grad/{net}/clip_limit_max"] * (1 + 1e-6)
        assert 0.0 <= s[f"grad/{net}/clip_fraction"] <= 1.0
        assert s[f"grad/{net}/clip_limit"] > 0
    # the reward jump at update 9 makes the critic's norm leap above its own history: that update is clipped
    assert s["grad/critic/clip_fraction"] > 0.0


@pytest.mark.parametrize("mode", ["adaptive", "zscore"])
def test_adaptive_state_survives_a_checkpoint(mode: str) -> None:
    cfg = {"clip.mode": mode, "clip.warmup": 2}
    a, b = make_agent(policy_freq=1, **cfg), make_agent(policy_freq=1, **cfg)
    for i in range(5):
        a.update(make_batch(i), step=i)
    b.load_state_dict(a.state_dict())  # what a checkpoint holds
    norms = [torch.tensor(x) for x in (3.0, 0.5, 40.0, 2.0)]
    for net in ("actor", "critic"):
        la, lb = a.monitor.limits[net], b.monitor.limits[net]
        assert [float(la(n)) for n in norms] == [float(lb(n)) for n in norms]
    fresh = make_agent(policy_freq=1, **cfg).monitor.limits["critic"]  # without the state: other limits
    assert [float(fresh(n)) for n in norms] != [float(a.monitor.limits["critic"](n)) for n in norms]
