"""Clip strategies (agent.clip.mode): in every mode the same gradients are clipped as an independent computation
written here clips them; each mode's limit follows its published rule; ZClip survives a dead stretch; the
after <= limit-used invariant holds and is logged in every mode; null means off in every mode; the adaptive
state survives a checkpoint, and a state that does not fit is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from av_td3.agent.clipping import AGC, FixedNorm, NoClip, Percentile, ZScore, make_clipper
from av_td3.config import ClipConfig, ConfigError
from tests.test_td3 import make_agent, make_batch

CPU = torch.device("cpu")
NO_PARAMS: list[nn.Parameter] = []


def _limits(strategy, norms: list[float]) -> list[float]:
    return [float(strategy.limit(torch.tensor(n))) for n in norms]


# ----------------------------------------------------------------------------------------------- the limits
def test_percentile_limit_is_autoclips_percentile_of_the_recent_norms() -> None:
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0.0, 1.0, 60))
    got = _limits(Percentile("critic", NO_PARAMS, 7.0, percentile=90.0, window=20, warmup=5, device=CPU), norms)
    assert got[:5] == [7.0] * 5  # the fixed limit while the history fills
    for t in range(5, 60):  # the current norm included, the last `window` norms only
        assert got[t] == pytest.approx(np.percentile(norms[max(0, t - 19):t + 1], 90), rel=1e-5)


def zclip_reference(norms: list[float], z_t: float, ema: float, warmup: int, fixed: float, scaling: str) -> list[float]:
    """The limit each norm is clipped to, by the rule of the official ZClip code (bluorion-com/ZClip) in float64:
    the plain mean and variance of the first ``warmup`` norms, then z = (g - mean) / (std + 1e-6); when
    z > z_t the norm is clipped to mean + z_t^2 / z * std (adaptive) or mean + z_t * std (threshold), else it
    stands (the limit reported is mean + z_t * std); the EMAs are fed the norm as clipped. Zero norms are skipped
    and the limit floored at 1% of the fixed limit (this project's fix of a dead net's stretch of zeros)."""
    out, kept = [], []
    mean = var = 0.0
    for g in norms:
        if len(kept) < warmup:
            out.append(fixed)
            if g > 0:
                kept.append(g)
                if len(kept) == warmup:
                    mean, var = float(np.mean(kept)), float(np.var(kept))
            continue
        std = np.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        if z > z_t:
            limit = mean + (z_t ** 2 / z if scaling == "adaptive" else z_t) * std
        else:
            limit = mean + z_t * std
        limit = max(limit, 0.01 * fixed)
        out.append(limit)
        if g > 0:
            delta = min(g, limit) - mean
            mean += (1 - ema) * delta
            var = ema * (var + (1 - ema) * delta * delta)
    return out


@pytest.mark.parametrize("scaling", ["adaptive", "threshold"])
def test_zscore_limit_follows_the_zclip_rule(scaling: str) -> None:
    rng = np.random.default_rng(1)
    norms = list(rng.normal(10.0, 1.0, 80))
    norms[50] = 100.0  # a spike: clipped, and fed to the statistics as clipped
    norms[60] = 0.0  # a zero norm: not recorded
    got = _limits(ZScore("critic", NO_PARAMS, 3.0, z=2.5, ema=0.9, warmup=10, scaling=scaling, device=CPU), norms)
    want = zclip_reference(norms, 2.5, 0.9, 10, 3.0, scaling)
    assert got[:10] == [3.0] * 10
    assert got == pytest.approx(want, rel=1e-4)
    assert got[51] < 20.0  # the spike did not drag the limit up
    if scaling == "adaptive":  # the spike is clipped below the threshold, the more the further out it is
        assert got[50] < zclip_reference(norms, 2.5, 0.9, 10, 3.0, "threshold")[50]


@pytest.mark.parametrize("scaling", ["adaptive", "threshold"])
def test_zscore_survives_a_dead_stretch_of_zero_gradients(scaling: str) -> None:
    """A dead actor's norms stay exactly 0 for a long stretch: the statistics must not decay to nothing (before
    the fix they reached ~1e-22 and every later gradient was clipped to ~0, so the net could never recover)."""
    rng = np.random.default_rng(2)
    live = list(rng.normal(10.0, 1.0, 60))
    zscore = ZScore("actor", NO_PARAMS, 3.0, z=2.5, ema=0.97, warmup=25, scaling=scaling, device=CPU)
    before = _limits(zscore, live)[-1]
    _limits(zscore, [0.0] * 5000)
    after = _limits(zscore, [11.0])[0]
    assert after == pytest.approx(before, rel=0.2), "the limit is still of the order of the norms seen before"
    assert after > 10.0, "a real gradient of an ordinary size is not clipped"

    # zeros from the start: the warm-up waits for norms that carry information
    late = ZScore("actor", NO_PARAMS, 3.0, z=2.5, ema=0.97, warmup=25, scaling=scaling, device=CPU)
    assert _limits(late, [0.0] * 100 + live[:25]) == [3.0] * 125
    assert 8.0 < _limits(late, [10.0])[0] < 20.0

    # norms that truly shrink to nothing: the limit stops at its floor, 1% of the fixed limit
    shrinking = ZScore("actor", NO_PARAMS, 3.0, z=2.5, ema=0.9, warmup=5, scaling=scaling, device=CPU)
    assert _limits(shrinking, [10.0 * 0.5 ** k for k in range(200)])[-1] == pytest.approx(0.03)


# ------------------------------------------------------------------------------ the clip, against a reference
def toy_net() -> nn.Module:
    """A conv filter bank (4-D weight), a linear layer (2-D), a LayerNorm (1-D scale and bias): every unit kind."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def backward(net: nn.Module, t: int) -> None:
    """Gradients of batch ``t``; every 7th batch's loss is 50x larger (a spike)."""
    g = torch.Generator().manual_seed(t)
    net.zero_grad(set_to_none=True)
    scale = 50.0 if t % 7 == 6 else 1.0
    (scale * net(torch.randn(8, 2, 6, 6, generator=g)).pow(2).mean()).backward()


def global_reference(grads: list[torch.Tensor], limit: float) -> list[torch.Tensor]:
    """Global-norm clipping as torch.nn.utils.clip_grad_norm_ defines it: one factor min(1, limit / (norm +
    1e-6)) for every gradient, norm the L2 norm of all of them concatenated."""
    norm = float(torch.cat([g.flatten() for g in grads]).double().norm())
    return [g * min(1.0, limit / (norm + 1e-6)) for g in grads]


def agc_reference(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """Unit-wise AGC (Brock et al. 2021), one unit at a time: row i of a weight of 2+ dims (all its other dims),
    a 1-D parameter as one unit; a unit whose gradient norm exceeds lam * max(weight norm, 1e-3) is scaled to
    it (with clip_grad_norm_'s +1e-6 in the denominator)."""
    out = []
    for p, g in zip(params, grads):
        g = g.clone()
        rows = [(p, g)] if p.ndim <= 1 else [(p[i], g[i]) for i in range(p.shape[0])]
        for w_u, g_u in rows:
            limit = lam * max(float(w_u.norm()), 1e-3)
            g_norm = float(g_u.norm())
            if g_norm > limit:
                g_u.mul_(limit / (g_norm + 1e-6))
        out.append(g)
    return out


@pytest.mark.parametrize("mode, extra", [("norm", {}), ("adaptive", {}), ("zscore", {"zscore_scaling": "adaptive"}),
                                         ("zscore", {"zscore_scaling": "threshold"}), ("agc", {})],
                         ids=["norm", "adaptive", "zscore-adaptive", "zscore-threshold", "agc"])
def test_every_mode_clips_the_same_gradients_as_an_independent_computation(mode: str, extra: dict) -> None:
    net = toy_net()
    params = list(net.parameters())
    clip = ClipConfig(mode=mode, critic=0.8, percentile=50.0, window=10, warmup=5, z=1.0, ema=0.8, agc=0.05,
                      **extra)
    strategy = make_clipper(clip, "critic", params, CPU)
    norms: list[float] = []
    clipped_any = False
    for t in range(30):
        backward(net, t)
        raw = [p.grad.clone() for p in params]
        norm = float(torch.cat([g.flatten() for g in raw]).double().norm())
        norms.append(norm)
        if mode == "norm":
            want = global_reference(raw, 0.8)
        elif mode == "adaptive":
            limit = 0.8 if t < 5 else float(np.percentile(norms[-10:], 50))
            want = global_reference(raw, limit)
        elif mode == "zscore":
            want = global_reference(raw, zclip_reference(norms, 1.0, 0.8, 5, 0.8, clip.zscore_scaling)[-1])
        else:
            want = agc_reference([p.detach() for p in params], raw, 0.05)
        strategy.clip(torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])))
        for p, w, r in zip(params, want, raw):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7)
            clipped_any |= not torch.equal(w, r)
        with torch.no_grad():  # move the weights, so AGC's limits change from one batch to the next
            for p in params:
                p -= 0.05 * p.grad
    assert clipped_any, "the clip must bite, or the comparison proves nothing"


def test_null_means_off_in_every_mode() -> None:
    for mode in ("norm", "adaptive", "zscore", "agc"):
        assert isinstance(make_clipper(ClipConfig(mode=mode, actor=None), "actor", NO_PARAMS, CPU), NoClip)
    assert isinstance(make_clipper(ClipConfig(mode="norm"), "critic", NO_PARAMS, CPU), FixedNorm)
    assert isinstance(make_clipper(ClipConfig(mode="agc"), "critic", NO_PARAMS, CPU), AGC)
    net = toy_net()
    backward(net, 0)
    raw = [p.grad.clone() for p in net.parameters()]
    assert NoClip("actor", list(net.parameters())).clip(torch.tensor(1.0)) is None
    assert all(torch.equal(p.grad, r) for p, r in zip(net.parameters(), raw))


# ------------------------------------------------------------------------------------ in the agent's update
@pytest.mark.parametrize("mode", ["norm", "adaptive", "zscore", "agc"])
def test_every_mode_holds_after_clip_below_the_limit_used_and_logs_it(mode: str) -> None:
    agent = make_agent(policy_freq=1, **{"clip.mode": mode, "clip.warmup": 3, "clip.percentile": 50.0,
                                          "clip.agc": 0.01, "clip.actor": 0.05, "clip.critic": 5.0})
    for i in range(12):
        agent.update(make_batch(i, reward_scale=1.0 + 20.0 * (i == 9)), step=i)
    s = agent.monitor.flush(12).scalars
    for net in ("actor", "critic"):
        assert s[f"grad/{net}/after_over_limit_max"] <= 1.0 + 1e-6
        assert s[f"grad/{net}/total/after_clip_max"] <= s[f"grad/{net}/clip_limit_max"] * (1 + 1e-6)
        assert 0.0 <= s[f"grad/{net}/clip_fraction"] <= 1.0
        assert s[f"grad/{net}/clip_limit"] > 0
    # the critic is clipped on some updates (the reward jump at update 9 leaps above its own history)
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
        la, lb = a.clippers[net], b.clippers[net]
        assert [float(la.limit(n)) for n in norms] == [float(lb.limit(n)) for n in norms]
    fresh = make_agent(policy_freq=1, **cfg).clippers["critic"]  # without the state: other limits
    assert [float(fresh.limit(n)) for n in norms] != [float(a.clippers["critic"].limit(n)) for n in norms]


@pytest.mark.parametrize("saved, loaded, key", [
    ({"clip.mode": "zscore"}, {"clip.mode": "adaptive"}, "agent.clip.mode=adaptive"),
    ({"clip.mode": "adaptive"}, {"clip.mode": "norm"}, "agent.clip.mode=norm"),
    ({"clip.mode": "zscore"}, {"clip.mode": "zscore", "clip.actor": None}, "agent.clip.actor=null"),
    ({"clip.mode": "adaptive", "clip.window": 50}, {"clip.mode": "adaptive"}, "agent.clip.window=50"),
])
def test_a_clip_state_that_does_not_fit_is_refused_naming_the_key(saved: dict, loaded: dict, key: str) -> None:
    """The strategies' own check, which also guards checkpoints written before the clip mode was recorded in
    their compat (av_td3/train/resume.py): the message names the setting and the way out."""
    a = make_agent(policy_freq=1, **saved)
    a.update(make_batch(0), step=0)
    with pytest.raises(ConfigError, match=key) as err:
        make_agent(policy_freq=1, **loaded).load_state_dict(a.state_dict())
    assert "trainer.resume=none" in str(err.value)


def test_zscore_reads_the_state_checkpoints_held_before_the_fix() -> None:
    """Checkpoints written until 2026-12-06 kept the ZClip state in the monitor, counted norms on the host."""
    a = make_agent(policy_freq=1, **{"clip.mode": "zscore", "clip.warmup": 2})
    for i in range(4):
        a.update(make_batch(i), step=i)
    state = a.state_dict()
    old = {net: {"mean": c["mean"], "var": c["var"], "seen": 4} for net, c in state.pop("clip").items()}
    state["monitor"] = {**state["monitor"], "clip": old}
    b = make_agent(policy_freq=1, **{"clip.mode": "zscore", "clip.warmup": 2})
    b.load_state_dict(state)
    norm = torch.tensor(3.0)
    assert float(b.clippers["critic"].limit(norm)) == float(a.clippers["critic"].limit(norm))


def test_no_mode_adds_a_host_sync_to_the_update(monkeypatch) -> None:
    """Limits and clips stay on the device: every mode reads tensors back to the host exactly as often as an
    unclipped update does (the guard's one check per net, the optimizer's own), so no mode stalls a GPU."""
    reads = {"n": 0}
    for name in ("__bool__", "__float__", "item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, original=original, **k):
            reads["n"] += 1
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    counts = {}
    for mode, off in (("norm", True), ("norm", False), ("adaptive", False), ("zscore", False), ("agc", False)):
        agent = make_agent(policy_freq=1, **{"clip.mode": mode, "clip.warmup": 2,
                                              **({"clip.actor": None, "clip.critic": None} if off else {})})
        reads["n"] = 0
        for i in range(4):  # past the warm-up
            agent.update(make_batch(i), step=i)
        counts["off" if off else mode] = reads["n"]
    assert counts["off"] > 0, "the guard's checks must be counted, or the count proves nothing"
    assert all(n == counts["off"] for n in counts.values()), counts
