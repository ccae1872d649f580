"""The lean TD3 update (foreach Polyak/clipping, device-side monitoring, reused features, channels_last, the
gather-based random shift of ``agent.augment=shift``) is the same TD3 update as a plain, loop-based reference
written here (per-sample replicate-pad-and-crop for the shift, per-unit loops for ``agent.clip.mode=agc``,
hand-written Adam and SGD with momentum); and both encoder modes learn a toy task.

The reference follows the agent's documented design (av_td3/agent/td3.py): the actor loss reads the critic's
features of the batch computed before the critic step (detached, as in DrQ-v2); with ``agent.encoder=shared`` the
actor has no CNN and reads those features, and the target critic's CNN feeds both target networks.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from av_td3.agent.td3 import TD3, Spec
from av_td3.config import AgentConfig, ClipConfig, LrConfig, MonitorConfig
from av_td3.replay import Batch

SPEC = Spec(stack=3, height=64, width=64, state_dim=5, action_dim=2,
            state_scale=np.array([10.0, 2.0, 1.0, 8.0, 8.0], np.float32), action_names=("steer", "throttle_brake"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from more threads, and a single thread keeps these tests quick on a busy machine
    (spinning intra-op threads lose whole time slices to neighbouring processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ReferenceTD3:
    """Textbook TD3 on deep copies of an agent's networks: plain Python loops over parameters, hand-written Adam
    (or SGD with momentum), ``torch.nn.utils.clip_grad_norm_`` (or AGC one unit at a time), per-parameter Polyak
    averaging, smoothing noise from a generator in the same state as the agent's."""

    def __init__(self, agent: TD3) -> None:
        self.cfg = agent.cfg
        self.shared = agent.shared
        self.actor = copy.deepcopy(agent.actor)
        self.critic = copy.deepcopy(agent.critic)
        self.actor_target = copy.deepcopy(agent.actor_target)
        self.critic_target = copy.deepcopy(agent.critic_target)
        self.scale = torch.as_tensor(agent.spec.state_scale)
        self.noise = torch.Generator().manual_seed(12345)
        self.noise.set_state(agent._noise_gen.get_state())
        self.adam = {name: {"t": 0, "m": [torch.zeros_like(p) for p in net.parameters()],
                            "v": [torch.zeros_like(p) for p in net.parameters()]}
                     for name, net in (("actor", self.actor), ("critic", self.critic))}
        self.momentum = {name: [None] * len(list(net.parameters()))
                         for name, net in (("actor", self.actor), ("critic", self.critic))}
        self.iterations = 0
        self.norms_before_clip: dict[str, list[float]] = {"actor": [], "critic": []}
        self.units_clipped = {"actor": 0, "critic": 0}  # agc
        # agent.augment=shift: offsets from a generator in the same state as the agent's augmenter
        self.shift_pad = agent.cfg.augment_pad if agent.cfg.augment == "shift" else 0
        self.shift_gen = torch.Generator().manual_seed(0)
        if self.shift_pad:
            self.shift_gen.set_state(agent._augment.generator.get_state())

    def _shift(self, images: torch.Tensor) -> torch.Tensor:
        """DrQ's random shift as the papers write it: replicate-pad each image by ``pad``, crop H x W at a random
        offset of 0 .. 2 * pad, one sample at a time."""
        if not self.shift_pad:
            return images
        n, _, h, w = images.shape
        offsets = torch.randint(0, 2 * self.shift_pad + 1, (n, 2), generator=self.shift_gen)
        padded = F.pad(images, (self.shift_pad,) * 4, mode="replicate")
        return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])

    def _adam_step(self, name: str, net: torch.nn.Module, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
        st = self.adam[name]
        st["t"] += 1
        t = st["t"]
        with torch.no_grad():
            for p, m, v in zip(net.parameters(), st["m"], st["v"]):
                g = p.grad
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat = m / (1 - b1 ** t)
                v_hat = v / (1 - b2 ** t)
                p -= lr * m_hat / (v_hat.sqrt() + eps)

    def _sgd_step(self, name: str, net: torch.nn.Module, lr: float) -> None:
        """torch.optim.SGD's momentum (no dampening): b = g on a parameter's first step, then b = mu * b + g."""
        buffers = self.momentum[name]
        with torch.no_grad():
            for i, p in enumerate(net.parameters()):
                g = p.grad
                buffers[i] = g.clone() if buffers[i] is None else self.cfg.momentum * buffers[i] + g
                p -= lr * buffers[i]

    def _step(self, name: str, net: torch.nn.Module, lr: float) -> None:
        if self.cfg.optimizer == "sgd":
            self._sgd_step(name, net, lr)
        else:
            self._adam_step(name, net, lr)

    def _clip(self, name: str, net: torch.nn.Module, limit: float | None) -> None:
        params = [p for p in net.parameters() if p.grad is not None]
        if self.cfg.clip.mode == "agc" and limit is not None:
            self._agc(name, params)
            return
        norm = torch.nn.utils.clip_grad_norm_(params, limit if limit is not None else float("inf"))
        self.norms_before_clip[name].append(float(norm))

    def _agc(self, name: str, params: list[torch.nn.Parameter]) -> None:
        """Unit-wise AGC, one unit at a time: row i of a weight of 2+ dims, a 1-D parameter whole; a unit whose
        gradient norm exceeds lambda * max(weight norm, 1e-3) is scaled to it (clip_grad_norm_'s +1e-6)."""
        lam = self.cfg.clip.agc
        with torch.no_grad():
            for p in params:
                rows = [(p, p.grad)] if p.ndim <= 1 else [(p[i], p.grad[i]) for i in range(p.shape[0])]
                for w_u, g_u in rows:
                    limit = lam * max(float(w_u.norm()), 1e-3)
                    g_norm = float(g_u.norm())
                    if g_norm > limit:
                        g_u.mul_(limit / (g_norm + 1e-6))
                        self.units_clipped[name] += 1

    def update(self, b: Batch) -> None:
        cfg = self.cfg
        images, next_images = b.obs_image.float() / 255.0, b.next_image.float() / 255.0
        images, next_images = self._shift(images), self._shift(next_images)
        states, next_states = b.obs_state / self.scale, b.next_state / self.scale
        with torch.no_grad():
            next_critic_features = self.critic_target.encoder(next_images)
            next_actor_features = next_critic_features if self.shared else self.actor_target.encoder(next_images)
            next_action = self.actor_target(next_actor_features, next_states)
            noise = torch.randn(next_action.shape, generator=self.noise) * cfg.policy_noise
            next_action = (next_action + noise.clamp(-cfg.noise_clip, cfg.noise_clip)).clamp(-1.0, 1.0)
            q1_next, q2_next = self.critic_target(next_critic_features, next_states, next_action)
            y = b.reward + cfg.gamma * (1.0 - b.done) * torch.min(q1_next, q2_next)

        features = self.critic.encoder(images)
        q1, q2 = self.critic(features, states, b.action)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        for p in self.critic.parameters():
            p.grad = None
        critic_loss.backward()
        self._clip("critic", self.critic, cfg.clip.critic)
        self._step("critic", self.critic, cfg.lr.critic)
        self.iterations += 1

        if self.iterations % cfg.policy_freq == 0:
            actor_features = features.detach() if self.shared else self.actor.encoder(images)
            actor_loss = -self.critic.q1(features.detach(), states, self.actor(actor_features, states)).mean()
            for p in self.actor.parameters():
                p.grad = None
            actor_loss.backward()
            self._clip("actor", self.actor, cfg.clip.actor)
            self._step("actor", self.actor, cfg.lr.actor)
            with torch.no_grad():
                for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                    for p, tp in zip(net.parameters(), target.parameters()):
                        tp.copy_(cfg.tau * p + (1 - cfg.tau) * tp)


def random_batch(g: torch.Generator, b: int = 16) -> Batch:
    frames = torch.randint(0, 256, (b, SPEC.stack + 1, SPEC.height, SPEC.width), generator=g, dtype=torch.uint8)
    return Batch(obs_image=frames[:, :-1], obs_state=torch.randn(b, 5, generator=g) * 3,
                 action=torch.rand(b, 2, generator=g) * 2 - 1, reward=torch.randn(b, generator=g),
                 next_image=frames[:, 1:], next_state=torch.randn(b, 5, generator=g) * 3,
                 done=(torch.rand(b, generator=g) < 0.25).float())


@pytest.mark.parametrize("encoder", ["separate", "shared"])
@pytest.mark.parametrize("monitor", [True, False])
@pytest.mark.parametrize("augment", ["none", "shift"])
def test_lean_update_matches_the_loop_reference(encoder: str, monitor: bool, augment: str) -> None:
    # Small clip limits so clipping bites on both networks; high learning rates so a wrong step would show.
    cfg = AgentConfig(batch_size=16, encoder=encoder, features_dim=16, hidden_dim=32, policy_freq=2, augment=augment,
                      augment_pad=4, clip=ClipConfig(actor=0.005, critic=0.5), lr=LrConfig(actor=1e-3, critic=2e-3))
    agent = TD3(cfg, MonitorConfig(enabled=monitor), SPEC, torch.device("cpu"), q_bound=1e6, seed=3)
    ref = ReferenceTD3(agent)
    before = {name: [p.detach().clone() for p in getattr(agent, name).parameters()]
              for name in ("actor", "critic", "actor_target", "critic_target")}
    g = torch.Generator().manual_seed(7)
    for step in range(1, 6):  # N = 5: critic 5 times, actor and targets twice
        batch = random_batch(g)
        agent.update(batch, step)
        ref.update(batch)
    assert agent.critic_updates == 5 and agent.actor_updates == 2
    assert max(ref.norms_before_clip["critic"]) > cfg.clip.critic, "clipping must bite on the critic"
    assert max(ref.norms_before_clip["actor"]) > cfg.clip.actor, "clipping must bite on the actor"
    for name in ("actor", "critic", "actor_target", "critic_target"):
        ours = dict(getattr(agent, name).named_parameters())
        theirs = dict(getattr(ref, name).named_parameters())
        assert ours.keys() == theirs.keys()
        for pname, p in ours.items():
            where = f"{encoder}: {name}.{pname}"
            torch.testing.assert_close(p.detach(), theirs[pname].detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, where=where: f"{where} differs from the reference: {m}")
        assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(ours.values(), before[name])), \
            f"{name} did not change, the comparison would prove nothing"


@pytest.mark.parametrize("mode, optimizer", [("agc", "adam"), ("norm", "sgd"), ("agc", "sgd")])
def test_agc_and_sgd_updates_match_the_loop_reference(mode: str, optimizer: str) -> None:
    """agent.clip.mode=agc clips unit by unit as the loops above do; agent.optimizer=sgd steps both nets as
    torch's SGD with momentum does, written out."""
    cfg = AgentConfig(batch_size=16, encoder="separate", features_dim=16, hidden_dim=32, policy_freq=2,
                      augment="none", optimizer=optimizer, momentum=0.8,
                      clip=ClipConfig(mode=mode, actor=0.005, critic=0.5, agc=0.01),
                      lr=LrConfig(1e-3, 2e-3) if optimizer == "adam" else LrConfig(0.05, 0.05))
    agent = TD3(cfg, MonitorConfig(), SPEC, torch.device("cpu"), q_bound=1e6, seed=3)
    ref = ReferenceTD3(agent)
    before = {name: [p.detach().clone() for p in getattr(agent, name).parameters()]
              for name in ("actor", "critic", "actor_target", "critic_target")}
    g = torch.Generator().manual_seed(7)
    for step in range(1, 6):
        batch = random_batch(g)
        agent.update(batch, step)
        ref.update(batch)
    if mode == "agc":
        assert ref.units_clipped["critic"] > 0 and ref.units_clipped["actor"] > 0, "AGC must bite on both nets"
    else:
        assert max(ref.norms_before_clip["critic"]) > cfg.clip.critic, "clipping must bite on the critic"
    for name in ("actor", "critic", "actor_target", "critic_target"):
        ours = dict(getattr(agent, name).named_parameters())
        theirs = dict(getattr(ref, name).named_parameters())
        for pname, p in ours.items():
            where = f"{mode}/{optimizer}: {name}.{pname}"
            torch.testing.assert_close(p.detach(), theirs[pname].detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, where=where: f"{where} differs: {m}")
        assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(ours.values(), before[name])), \
            f"{name} did not change, the comparison would prove nothing"


# --------------------------------------------------------------------------------------------------------- toy task
TOY = Spec(stack=1, height=20, width=20, state_dim=1, action_dim=2, state_scale=np.ones(1, np.float32),
           action_names=("steer", "throttle_brake"))


def toy_images(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright 3x3 square at a random place on a dark image; the best action is its (column, row) in [-0.8, 0.8]."""
    rows, cols = rng.integers(1, TOY.height - 1, n), rng.integers(1, TOY.width - 1, n)
    img = np.full((n, 1, TOY.height, TOY.width), 20, dtype=np.uint8)
    for i, (r, c) in enumerate(zip(rows, cols)):
        img[i, 0, r - 1:r + 2, c - 1:c + 2] = 255
    target = np.stack([cols / (TOY.width - 1), rows / (TOY.height - 1)], axis=1) * 1.6 - 0.8
    return torch.from_numpy(img), torch.from_numpy(target.astype(np.float32))


def toy_error(agent: TD3, images: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared distance of the deterministic policy's action from the best one (= -expected reward)."""
    obs = {"image": images.numpy(), "state": np.zeros((len(images), 1), np.float32)}
    return float(((torch.from_numpy(agent.act(obs)) - target) ** 2).sum(1).mean())


@pytest.mark.parametrize("encoder", ["separate", "shared"])
def test_both_encoder_modes_learn_a_one_step_bandit(encoder: str) -> None:
    """reward = -|action - best(image)|^2, one-step episodes, uniform exploration: the policy must read the
    square's position from the pixels."""
    start = time.perf_counter()
    cfg = AgentConfig(batch_size=64, encoder=encoder, features_dim=32, hidden_dim=64, use_state=False, gamma=0.5,
                      augment="none", lr=LrConfig(actor=1e-3, critic=1e-3))
    agent = TD3(cfg, MonitorConfig(), TOY, torch.device("cpu"), q_bound=1e6, seed=0)
    rng = np.random.default_rng(0)
    eval_images, eval_target = toy_images(np.random.default_rng(123), 256)
    initial = toy_error(agent, eval_images, eval_target)
    zeros = torch.zeros(cfg.batch_size, 1)
    for step in range(1, 401):
        images, target = toy_images(rng, cfg.batch_size)
        action = torch.from_numpy(rng.uniform(-1, 1, (cfg.batch_size, 2)).astype(np.float32))
        reward = -((action - target) ** 2).sum(1)
        agent.update(Batch(obs_image=images, obs_state=zeros, action=action, reward=reward, next_image=images,
                           next_state=zeros, done=torch.ones(cfg.batch_size)), step)
    final = toy_error(agent, eval_images, eval_target)
    print(f"{encoder}: squared error {initial:.3f} -> {final:.3f} in {time.perf_counter() - start:.1f} s")
    assert final < 0.25 * initial, f"{encoder}: policy error {initial:.3f} -> {final:.3f}, not clearly better"
