"""TD3 update mechanics: delayed actor/target updates, target smoothing, clipping, encoder modes, guards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from av_td3.agent.monitor import NonFiniteError
from av_td3.agent.td3 import TD3, Spec
from av_td3.config import AgentConfig, MonitorConfig
from av_td3.replay import Batch

SPEC = Spec(stack=2, height=24, width=24, state_dim=5, action_dim=2, state_scale=np.ones(5, np.float32),
            action_names=("steer", "throttle_brake"))


def make_agent(**overrides) -> TD3:
    # augment="none": these tests check the update's own arithmetic; augmentation has its own (test_augment.py).
    cfg = AgentConfig(batch_size=8, features_dim=16, hidden_dim=32, augment="none")
    mon = MonitorConfig()
    for key, value in overrides.items():
        target = cfg
        if key.startswith("monitor."):
            target, key = mon, key.split(".", 1)[1]
        *path, leaf = key.split(".")
        for p in path:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return TD3(cfg, mon, SPEC, torch.device("cpu"), q_bound=1e6, seed=0)


def make_batch(seed: int = 0, b: int = 8, reward_scale: float = 1.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (b, SPEC.stack, SPEC.height, SPEC.width), generator=g, dtype=torch.uint8)  # noqa: E731
    return Batch(obs_image=img(), obs_state=torch.randn(b, 5, generator=g),
                 action=torch.rand(b, 2, generator=g) * 2 - 1, reward=torch.randn(b, generator=g) * reward_scale,
                 next_image=img(), next_state=torch.randn(b, 5, generator=g),
                 done=(torch.rand(b, generator=g) < 0.2).float())


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("policy_freq", [1, 2, 3])
def test_actor_and_targets_change_only_every_policy_freq_critic_updates(policy_freq: int) -> None:
    agent = make_agent(policy_freq=policy_freq)
    for i in range(1, 7):
        actor, actor_t, critic_t = params(agent.actor), params(agent.actor_target), params(agent.critic_target)
        critic = params(agent.critic)
        agent.update(make_batch(i), step=i)
        actor_step = i % policy_freq == 0
        assert not same(critic, params(agent.critic)), "the critic updates every time"
        assert same(actor, params(agent.actor)) != actor_step
        assert same(actor_t, params(agent.actor_target)) != actor_step
        assert same(critic_t, params(agent.critic_target)) != actor_step
    assert agent.critic_updates == 6 and agent.actor_updates == 6 // policy_freq


def test_target_smoothing_noise_is_clipped_by_noise_clip() -> None:
    """With noise_clip=0 the smoothing noise vanishes: same update as policy_noise=0; with noise_clip>0 it differs."""
    results = {}
    for name, noise, clip in [("off", 0.0, 0.5), ("clipped_away", 0.5, 0.0), ("on", 0.5, 0.5)]:
        agent = make_agent(policy_noise=noise, noise_clip=clip)
        agent.update(make_batch(1), step=1)
        results[name] = params(agent.critic)
    assert same(results["off"], results["clipped_away"])
    assert not same(results["off"], results["on"])


def test_critic_loss_uses_min_of_twin_targets_and_done_mask() -> None:
    agent = make_agent(policy_noise=0.0, encoder="separate")  # each target network runs its own encoder
    batch = make_batch(2)
    with torch.no_grad():
        img = batch.next_image.float() / 255
        feat = agent.critic_target.encoder(img)
        a = agent.actor_target(agent.actor_target.encoder(img), batch.next_state)
        q1, q2 = agent.critic_target(feat, batch.next_state, a)
        y = batch.reward + agent.cfg.gamma * (1 - batch.done) * torch.minimum(q1, q2)
        f0 = agent.critic.encoder(batch.obs_image.float() / 255)
        c1, c2 = agent.critic(f0, batch.obs_state, batch.action)
        expected = torch.nn.functional.mse_loss(c1, y) + torch.nn.functional.mse_loss(c2, y)
    agent.update(batch, step=1)
    got = agent.monitor.flush(1).scalars["train/critic_loss"]
    assert got == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("net", ["actor", "critic"])
def test_clipping_bounds_the_global_norm_over_cnn_and_mlp(net: str, monkeypatch) -> None:
    limit = 1e-3  # tiny, so every update clips
    agent = make_agent(**{f"clip.{net}": limit, "policy_freq": 1})
    seen = []
    opt = agent.actor_opt if net == "actor" else agent.critic_opt
    original = opt.step

    def spy(*args, **kwargs):
        grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.cat(grads)).item())
        return original(*args, **kwargs)

    monkeypatch.setattr(opt, "step", spy)
    for i in range(4):
        agent.update(make_batch(i, reward_scale=100.0), step=i)
    assert len(seen) == 4
    assert all(n <= limit * (1 + 1e-4) for n in seen)
    s = agent.monitor.flush(4).scalars
    assert s[f"grad/{net}/total/before_clip"] > limit
    assert s[f"grad/{net}/clip_fraction"] == 1.0
    assert s[f"grad/{net}/total/after_clip_max"] <= limit * (1 + 1e-4)


def test_shared_encoder_is_trained_by_the_critic_only() -> None:
    agent = make_agent(encoder="shared", policy_freq=1)
    assert agent.actor.encoder is None
    assert agent.actor.parts()["cnn"] == []
    batch = make_batch(3)
    # The actor loss alone must leave the encoder's gradients untouched.
    images = batch.obs_image.float() / 255
    features = agent.critic.encoder(images)
    agent.critic.zero_grad(set_to_none=True)
    loss = -agent.critic.q1(features.detach(), batch.obs_state, agent.actor(features.detach(), batch.obs_state)).mean()
    loss.backward()
    assert all(p.grad is None for p in agent.critic.encoder.parameters())
    assert any(p.grad is not None for p in agent.actor.parameters())
    agent.update(batch, step=1)
    tags = agent.monitor.flush(1).scalars
    assert "grad/actor/cnn/before_clip" not in tags, "shared mode has no actor CNN: no zeros logged for it"
    assert "grad/actor/mlp/before_clip" in tags and "grad/critic/cnn/before_clip" in tags


def test_shared_mode_encodes_each_batch_once_per_network(monkeypatch) -> None:
    agent = make_agent(encoder="shared", policy_freq=1)
    calls = []
    for enc in (agent.critic.encoder, agent.critic_target.encoder):
        enc.register_forward_hook(lambda m, i, o, enc=enc: calls.append(enc))
    agent.update(make_batch(4), step=1)
    # one online encoding (obs) + one target encoding (next obs), reused by critic and actor losses
    assert calls.count(agent.critic.encoder) == 1 and calls.count(agent.critic_target.encoder) == 1


def test_separate_mode_actor_cnn_is_trained_by_actor_loss() -> None:
    agent = make_agent(encoder="separate", policy_freq=1)
    before_actor_cnn = params(agent.actor.encoder)
    before_critic_cnn = params(agent.critic.encoder)
    agent.update(make_batch(5), step=1)
    assert not same(before_actor_cnn, params(agent.actor.encoder))
    assert not same(before_critic_cnn, params(agent.critic.encoder))


@pytest.mark.parametrize("num_critics", [1, 2])
def test_num_critics_sets_q_heads(num_critics: int) -> None:
    agent = make_agent(num_critics=num_critics)
    assert len(agent.critic.heads) == num_critics
    agent.update(make_batch(), step=1)
    assert ("train/q2" in agent.monitor.flush(1).scalars) == (num_critics == 2)


def test_nan_guard_stop_raises_before_the_step_and_keeps_weights_finite() -> None:
    agent = make_agent(**{"lr.critic": 1e30})
    batch = make_batch(6, reward_scale=1e30)
    critic_before = params(agent.critic)
    with pytest.raises(NonFiniteError) as err:
        for i in range(50):
            critic_before = params(agent.critic)
            agent.update(batch, step=i)
    assert "critic" in err.value.quantity
    assert same(critic_before, params(agent.critic)), "the failing update must not have stepped"
    assert all(torch.isfinite(p).all() for p in agent.critic.parameters())


def test_nan_guard_skip_drops_the_update_and_counts_it() -> None:
    agent = make_agent(**{"monitor.nan_policy": "skip"})
    batch = make_batch(7)
    batch = batch._replace(reward=torch.full_like(batch.reward, float("nan")))
    critic_before = params(agent.critic)
    agent.update(batch, step=1)
    agent.update(batch, step=2)
    assert same(critic_before, params(agent.critic))
    assert agent.monitor.skipped_updates >= 2
    assert agent.monitor.flush(2).scalars["guard/skipped_updates"] >= 2


def test_non_finite_action_never_reaches_the_simulator() -> None:
    agent = make_agent()
    with pytest.raises(NonFiniteError):
        agent.check_action(np.array([[np.nan, 0.0]], np.float32), step=3)
    skip = make_agent(**{"monitor.nan_policy": "skip"})
    out = skip.check_action(np.array([[np.inf, 0.0]], np.float32), step=3)
    assert np.all(np.isfinite(out)) and skip.monitor.nonfinite_actions == 1


@pytest.mark.parametrize("overrides", [{}, {"clip.mode": "agc"},
                                       {"optimizer": "sgd", "lr.actor": 1e-3, "lr.critic": 1e-3},
                                       {"clip.mode": "adaptive", "clip.warmup": 2},
                                       {"clip.mode": "zscore", "clip.warmup": 2}],
                         ids=["norm", "agc", "sgd", "adaptive", "zscore"])
def test_state_dict_round_trip_continues_identically(overrides: dict) -> None:
    """Every clip mode and optimizer (a killed process's resume, end to end: tests/test_resume.py)."""
    a = make_agent(**overrides)
    for i in range(3):
        a.update(make_batch(i), step=i)
    b = make_agent(**overrides)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i in range(3, 6):
        a.update(make_batch(i), step=i)
        b.update(make_batch(i), step=i)
    assert same(params(a.actor), params(b.actor)) and same(params(a.critic_target), params(b.critic_target))


def test_n_step_discount_of_a_batch_replaces_gamma() -> None:
    """A batch's own discount (n-step sampling) is what the critic target bootstraps with; gamma when it has none."""
    gamma = 0.9
    results = []
    for discount in (None, gamma, gamma ** 3):
        agent = make_agent(gamma=gamma)
        batch = make_batch(1, reward_scale=5.0)
        if discount is not None:
            batch = batch._replace(discount=torch.full((8,), discount))
        agent.update(batch, step=1)
        results.append(params(agent.critic))
    assert same(results[0], results[1]), "discount = gamma is the one-step update"
    assert not same(results[0], results[2])


@pytest.mark.parametrize("encoder", ["shared", "separate"])
def test_bf16_runs_the_convolutions_in_bfloat16_and_keeps_the_rest_float32(encoder: str) -> None:
    """agent.precision=bf16: every convolution of the update (online, target, the actor's own CNN) computes in
    bfloat16; features, Q values, losses, gradients and parameters stay float32, so the monitor and clipping see
    float32 norms."""
    agent = make_agent(precision="bf16", encoder=encoder)
    seen: dict[str, set] = {"conv": set(), "features": set()}
    for net in (agent.critic, agent.critic_target, agent.actor, agent.actor_target):
        if net.encoder is None:
            continue
        for module in net.encoder.convs:
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype))
    original = agent._encode
    agent._encode = lambda enc, images: seen["features"].add(original(enc, images).dtype) or original(enc, images)
    for i in range(2):  # policy_freq 2: the second update steps the actor and the targets too
        agent.update(make_batch(i), step=i)
    assert seen == {"conv": {torch.bfloat16}, "features": {torch.float32}}
    for p in params(agent.actor) + params(agent.critic):
        assert p.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in agent.critic.parameters())


def test_bf16_update_follows_the_fp32_update_to_bf16_rounding() -> None:
    """The same equations: from the same seed and batches, bf16's parameters move like fp32's (each update's
    change agrees to a few percent), and differ only by rounding."""
    fp32, bf16 = make_agent(), make_agent(precision="bf16")
    start = params(fp32.critic)
    for i in range(3):
        fp32.update(make_batch(i), step=i)
        bf16.update(make_batch(i), step=i)
    step32 = torch.cat([(p - s).flatten() for p, s in zip(params(fp32.critic), start)])
    step16 = torch.cat([(p - s).flatten() for p, s in zip(params(bf16.critic), start)])
    assert not torch.equal(step32, step16)
    assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.95
    assert (step16 - step32).norm() < 0.25 * step32.norm()


@pytest.mark.parametrize("layout", ["contiguous", "replay slice", "shifted"])
def test_frames_become_the_same_floats_in_channels_last_whatever_their_strides(layout: str) -> None:
    """The update's uint8 → float conversion (stacking planes, for speed) gives exactly what torch's own
    channels_last conversion gives, with its strides, for every layout the update feeds it."""
    agent = make_agent(augment="shift")
    frames = torch.randint(0, 256, (8, SPEC.stack + 1, SPEC.height, SPEC.width), dtype=torch.uint8)
    image = {"contiguous": frames[:, :SPEC.stack].contiguous(), "replay slice": frames[:, 1:],
             "shifted": agent._augment(frames[:, 1:])}[layout]
    expected = image.to(dtype=torch.float32, memory_format=torch.channels_last) / 255.0
    got = agent._images(image)
    assert torch.equal(got, expected) and got.stride() == expected.stride() and got.dtype == torch.float32
