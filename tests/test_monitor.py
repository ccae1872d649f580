"""The gradient monitor against independent computations, and alerts that can fire. The monitor only measures;
the clip here is the strategy's (av_td3/agent/clipping.py), called between the two measurements as TD3.update
calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from av_td3.agent.clipping import Clip, make_clipper
from av_td3.agent.monitor import GradMonitor
from av_td3.config import ClipConfig, MonitorConfig
from tests.test_td3 import make_agent, make_batch


def toy_net(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


def backward(cnn: nn.Module, mlp: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(4, 1, 6, 6)
    h = cnn(x).flatten(1)[:, :8]
    loss = scale * mlp(h).pow(2).sum()
    loss.backward()
    return loss


def independent_norm(module_list: list[nn.Module]) -> float:
    """The definition: L2 norm of ALL the gradients concatenated."""
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for m in module_list for p in m.parameters()])).item()


def sum_of_norms(module_list: list[nn.Module]) -> float:
    """The seed system's mistake: the sum of per-parameter norms."""
    return sum(p.grad.norm().item() for m in module_list for p in m.parameters())


class Monitored:
    """A critic's GradMonitor and clip strategy (``agent.clip.mode=mode`` with the fixed limit ``limit``), called
    in TD3.update's order: measure, clip, measure again."""

    def __init__(self, cnn: nn.Module, mlp: nn.Module, limit: float | None, mode: str = "norm", agc: float = 0.3,
                 **mon) -> None:
        clip = ClipConfig(mode=mode, actor=limit, critic=limit, agc=agc)
        self.monitor = GradMonitor(MonitorConfig(**mon), clip,
                                   {"critic": {"cnn": list(cnn.parameters()), "mlp": list(mlp.parameters())}},
                                   q_bound=1e9, action_names=("steer", "throttle_brake"), device=torch.device("cpu"))
        self.clipper = make_clipper(clip, "critic", [*cnn.parameters(), *mlp.parameters()], torch.device("cpu"))

    def update(self, loss: torch.Tensor, step: int) -> bool:
        norms = self.monitor.before_clip("critic", loss, step)
        if norms is None:
            return False
        self.monitor.after_clip("critic", norms, self.clipper.clip(norms.total))
        return True

    def flush(self, step: int):
        return self.monitor.flush(step)


def test_norms_match_an_independent_computation_and_reject_sum_of_norms() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None)
    loss = backward(cnn, mlp)
    expected = {"cnn": independent_norm([cnn]), "mlp": independent_norm([mlp]), "total": independent_norm([cnn, mlp])}
    wrong = sum_of_norms([cnn, mlp])
    assert mon.update(loss, step=1)
    s = mon.flush(1).scalars
    for part, value in expected.items():
        assert s[f"grad/critic/{part}/before_clip"] == pytest.approx(value, rel=1e-5)
    # the old sum-of-norms would fail this very assertion
    assert wrong != pytest.approx(s["grad/critic/total/before_clip"], rel=1e-2)


def test_after_clip_is_measured_after_clipping_on_the_same_backward() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=0.5)
    loss = backward(cnn, mlp, scale=10.0)
    before = independent_norm([cnn, mlp])
    assert before > 0.5
    mon.update(loss, step=1)
    after = independent_norm([cnn, mlp])  # the gradients the optimizer will see
    s = mon.flush(1).scalars
    assert s["grad/critic/total/before_clip"] == pytest.approx(before, rel=1e-5)
    assert s["grad/critic/total/after_clip"] == pytest.approx(after, rel=1e-5)
    assert after <= 0.5 * (1 + 1e-4)
    assert s["grad/critic/clip_coef"] == pytest.approx(after / before, rel=1e-5)
    assert s["grad/critic/clip_fraction"] == 1.0 and s["alert/critic/clip_violation"] == 0.0


def test_unclipped_after_equals_before_and_is_still_logged() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None)
    mon.update(backward(cnn, mlp, scale=10.0), step=1)
    s = mon.flush(1).scalars
    for part in ("cnn", "mlp", "total"):
        assert s[f"grad/critic/{part}/after_clip"] == s[f"grad/critic/{part}/before_clip"]
    assert s["grad/critic/clip_coef"] == 1.0 and s["grad/critic/clip_fraction"] == 0.0


def test_interval_mean_max_and_update_count_cover_every_update() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None)
    norms = []
    for k in range(5):
        cnn.zero_grad(), mlp.zero_grad()
        loss = backward(cnn, mlp, scale=float(k + 1))
        norms.append(independent_norm([cnn, mlp]))
        mon.update(loss, step=k)
    s = mon.flush(5).scalars
    assert s["grad/critic/updates"] == 5
    assert s["grad/critic/total/before_clip"] == pytest.approx(sum(norms) / 5, rel=1e-5)
    assert s["grad/critic/total/before_clip_max"] == pytest.approx(max(norms), rel=1e-5)


def test_actor_metrics_only_from_actor_updates() -> None:
    agent = make_agent(policy_freq=3, encoder="separate")  # an actor with a CNN part of its own
    for i in range(1, 10):
        agent.update(make_batch(i), step=i)
    s = agent.monitor.flush(9).scalars
    assert s["grad/critic/updates"] == 9 and s["grad/actor/updates"] == 3
    # no zeros padded in from the 6 critic-only updates: the actor's smallest interval mean is its real mean
    assert s["grad/actor/mlp/before_clip"] > 0 and s["grad/actor/cnn/before_clip"] > 0
    # an interval without an actor update has no actor gradient tags at all
    agent.update(make_batch(10), step=10)
    s2 = agent.monitor.flush(10).scalars
    assert "grad/actor/total/before_clip" not in s2 and "train/actor_loss" not in s2
    assert s2["grad/critic/updates"] == 1


def test_flush_is_one_host_transfer(monkeypatch) -> None:
    agent = make_agent(policy_freq=1)
    for i in range(3):
        agent.update(make_batch(i), step=i)
    transfers = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(1) or original(self, *a, **k))
    agent.monitor.flush(3)
    assert len(transfers) == 1


def test_clip_violation_fires_when_clipping_is_broken(monkeypatch) -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=0.5)
    monkeypatch.setattr("av_td3.agent.clipping.clip_to", lambda *a, **k: None)
    mon.update(backward(cnn, mlp, scale=10.0), step=1)
    result = mon.flush(1)
    assert "critic/clip_violation" in result.fired and result.scalars["alert/critic/clip_violation"] == 1.0
    assert result.scalars["grad/critic/after_over_limit_max"] > 1.0
    assert mon.monitor.alert_counts["critic/clip_violation"] == 1


def units(t: torch.Tensor) -> torch.Tensor:
    """AGC's units, written out: a row per output of a weight of 2+ dims, a 1-D parameter whole."""
    return t.detach().flatten(1).norm(dim=1) if t.ndim > 1 else t.detach().norm().reshape(1)


def test_agc_clip_fraction_is_the_share_of_units_clipped_and_its_limit_their_global_bound() -> None:
    cnn, mlp = toy_net()
    params = [*cnn.parameters(), *mlp.parameters()]
    mon = Monitored(cnn, mlp, limit=1.0, mode="agc", agc=0.05)
    loss = backward(cnn, mlp, scale=10.0)
    limits = torch.cat([0.05 * units(p).clamp_min(1e-3) for p in params])
    clipped = (torch.cat([units(p.grad) for p in params]) > limits).float().mean().item()
    assert 0.0 < clipped < 1.0, "some units clipped and some not, or the share proves nothing"
    assert mon.update(loss, step=1)
    after = torch.cat([units(p.grad) for p in params])
    s = mon.flush(1).scalars
    assert s["grad/critic/clip_fraction"] == pytest.approx(clipped)
    # the limit logged: the largest global norm the unit limits allow, which the after-clip norm is under
    assert s["grad/critic/clip_limit"] == pytest.approx(limits.norm().item(), rel=1e-5)
    assert s["grad/critic/total/after_clip"] == pytest.approx(independent_norm([cnn, mlp]), rel=1e-5)
    assert s["grad/critic/total/after_clip"] <= s["grad/critic/clip_limit"]
    # the invariant, per unit: the worst unit's after-clip norm over its own limit
    assert s["grad/critic/after_over_limit_max"] == pytest.approx((after / limits).max().item(), rel=1e-5)
    assert s["grad/critic/after_over_limit_max"] <= 1.0 and s["alert/critic/clip_violation"] == 0.0


def test_clip_violation_fires_when_a_unit_exceeds_its_limit(caplog) -> None:
    cnn, mlp = toy_net()
    params = [*cnn.parameters(), *mlp.parameters()]
    mon = Monitored(cnn, mlp, limit=1.0, mode="agc")
    norms = mon.monitor.before_clip("critic", backward(cnn, mlp), step=1)
    actual = torch.cat([units(p.grad) for p in params])
    # a clip that claims limits half the size of the units it left alone: the measurement must catch it
    broken = Clip(limit=actual.norm() / 2, clipped=torch.tensor(1.0), unit_limits=actual.clamp_min(1e-3) / 2,
                  grads=tuple(p.grad for p in params))
    mon.monitor.after_clip("critic", norms, broken)
    result = mon.flush(1)
    assert "critic/clip_violation" in result.fired
    assert result.scalars["grad/critic/after_over_limit_max"] == pytest.approx(2.0, rel=1e-5)
    assert "a unit's after-clip norm 2 x the limit used" in caplog.text


def fixed_backward(cnn: nn.Module, mlp: nn.Module, scale: float) -> torch.Tensor:
    """The same batch every time, so the gradient norm is exactly proportional to ``scale``."""
    cnn.zero_grad(), mlp.zero_grad()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    loss = scale * mlp(cnn(x).flatten(1)[:, :8]).pow(2).sum()
    loss.backward()
    return loss


def drive(mon: Monitored, cnn: nn.Module, mlp: nn.Module, scales: list[float]) -> dict[str, float]:
    for i, scale in enumerate(scales):
        mon.update(fixed_backward(cnn, mlp, scale), step=i)
    return mon.flush(len(scales)).scalars


def test_a_steady_norm_far_above_the_limit_is_no_spike_and_no_alert() -> None:
    cnn, mlp = toy_net()
    norm = fixed_backward(cnn, mlp, 1.0) and independent_norm([cnn, mlp])
    mon = Monitored(cnn, mlp, limit=norm / 500)  # the norm runs at 500x the limit, with +-10% noise
    noise = torch.exp(0.1 * torch.randn(400, generator=torch.Generator().manual_seed(1))).tolist()
    s = drive(mon, cnn, mlp, noise)
    assert s["grad/critic/clip_fraction"] == 1.0 and s["grad/critic/spikes"] == 0.0
    assert mon.monitor.alert_counts == {}


def test_a_50x_jump_is_a_spike_against_the_nets_own_history(caplog) -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None, spike_alert_rate=0.0)  # alert on any spike
    noise = torch.exp(0.1 * torch.randn(300, generator=torch.Generator().manual_seed(1))).tolist()
    s = drive(mon, cnn, mlp, noise[:200] + [50.0] + noise[200:])
    assert s["grad/critic/spikes"] == 1.0 and s["alert/critic/grad_spike"] == 1.0
    # by default one spike in 301 updates (0.3%) is counted but not alerted on: the alert is for bursts (> 2%)
    quiet = drive(Monitored(cnn, mlp, limit=None), cnn, mlp, noise[:200] + [50.0] + noise[200:])
    assert quiet["grad/critic/spikes"] == 1.0 and quiet["alert/critic/grad_spike"] == 0.0
    burst = drive(Monitored(cnn, mlp, limit=None), cnn, mlp, noise[:200] + [50.0] * 8 + noise[200:])
    assert burst["alert/critic/grad_spike"] == 1.0
    # an unclipped net's alert says what happened, not "(limit None)"
    line = next(r.getMessage() for r in caplog.records if "ALERT critic/grad_spike" in r.getMessage())
    assert "1 of 301 updates' before-clip norms more than 4 std above" in line and "None" not in line
    assert s["grad/critic/total/before_clip_max"] == pytest.approx(50 * s["grad/critic/total/before_clip_p50"],
                                                                    rel=0.3)
    # during the warm-up the detector has no history to judge by: no spike
    mon = Monitored(cnn, mlp, limit=None, spike_warmup=100)
    assert drive(mon, cnn, mlp, noise[:50] + [50.0])["grad/critic/spikes"] == 0.0


def test_norm_percentiles_of_the_interval_match_numpy() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None)
    norms = []
    for i, scale in enumerate([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]):
        mon.update(fixed_backward(cnn, mlp, scale), step=i)
        norms.append(independent_norm([cnn, mlp]))
    s = mon.flush(7).scalars
    for q in (50, 90, 99):
        assert s[f"grad/critic/total/before_clip_p{q}"] == pytest.approx(float(np.percentile(norms, q)), rel=1e-5)


def test_dead_gradient_after_n_consecutive_zero_updates() -> None:
    cnn, mlp = toy_net()
    mon = Monitored(cnn, mlp, limit=None, dead_steps=3)
    for k in range(3):
        cnn.zero_grad(), mlp.zero_grad()
        loss = backward(cnn, mlp)
        for p in cnn.parameters():
            p.grad.zero_()  # a CNN that receives no gradient
        mon.update(loss, step=k)
        if k == 1:
            assert "critic/dead_gradient" not in mon.flush(k).fired
    assert "critic/dead_gradient" in mon.flush(3).fired


def test_q_divergence_and_action_saturation_alerts() -> None:
    agent = make_agent(policy_freq=1, **{"monitor.saturation_threshold": 0.0})
    agent.monitor.q_bound = 1e-9  # any Q is "divergent" against a tiny bound
    agent.update(make_batch(1), step=1)
    s = agent.monitor.flush(1)
    assert "critic/q_divergence" in s.fired
    assert "train/action_saturation/steer" in s.scalars
    agent.actor.head[-1].bias.data.fill_(100.0)  # push tanh into saturation
    agent.update(make_batch(2), step=2)
    res = agent.monitor.flush(2)
    assert res.scalars["train/action_saturation/steer"] == 1.0
    assert "actor/action_saturation" in res.fired
