"""TD3 (Fujimoto et al., 2018) from camera images, readable top to bottom in :meth:`TD3.update`.

DDPG is the same update configured with one critic, no target smoothing and ``policy_freq=1`` (``agent=ddpg``).

Encoder modes (``agent.encoder``):
* ``separate``: actor and critic each own a CNN, each trained by its own loss (the seed system, SB3's default);
* ``shared``: one CNN, owned and trained by the critic; the actor reads its detached features (DrQ-v2). The
  target critic's encoder feeds both target networks.
In both modes the batch is encoded once per network per update and the features are reused: the actor loss
reads the critic's features of the same batch (detached, computed before the critic step, as in DrQ-v2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from av_td3.agent import augment
from av_td3.agent.base import Flush, Health
from av_td3.agent.clipping import ClipStrategy, make_clipper
from av_td3.agent.monitor import GradMonitor, NonFiniteError
from av_td3.agent.networks import Actor, Critic, Encoder
from av_td3.config import AgentConfig, MonitorConfig


@dataclass(frozen=True)
class Spec:
    """Shapes the agent is built for (passed in rather than written into the config)."""
    stack: int
    height: int
    width: int
    state_dim: int
    action_dim: int
    state_scale: np.ndarray  # typical magnitude of each state entry (divides the state vector)
    action_names: tuple[str, ...]


def _optimizer(params: list[torch.nn.Parameter], lr: float, cfg: AgentConfig) -> torch.optim.Optimizer:
    """``agent.optimizer``: Adam, or SGD with ``agent.momentum`` (the clipping study's positive control: without
    Adam's per-parameter normalisation, a gradient's size is the step's size)."""
    # foreach: one multi-tensor kernel for all parameters instead of a Python loop over them.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, foreach=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


def _own_encoder(actor: Actor) -> Encoder:
    """The actor's own encoder: only under ``agent.encoder=separate`` (shared: None, it reads the critic's)."""
    assert actor.encoder is not None, "agent.encoder=shared: the actor has no encoder of its own"
    return actor.encoder


class TD3:
    """Implements :class:`av_td3.agent.base.Agent`; its metrics come from :class:`GradMonitor` (``self.monitor``)."""

    learning = True  # learns from replay: a buffer, random warm-up actions, update() calls

    def __init__(self, cfg: AgentConfig, monitor_cfg: MonitorConfig, spec: Spec, device: torch.device,
                 q_bound: float, seed: int = 0) -> None:
        self.cfg = cfg
        self.spec = spec
        self.device = device
        self.shared = cfg.encoder == "shared"
        state_dim = spec.state_dim if cfg.use_state else 0
        self._state_scale = torch.as_tensor(1.0 / spec.state_scale, dtype=torch.float32, device=device)
        enc = lambda: Encoder(spec.stack, spec.height, spec.width, cfg.features_dim)  # noqa: E731
        # Convolutions in channels_last (NHWC) on CPU: oneDNN computes the weight gradient of the first (8x8,
        # stride 4, 4-channel) conv about twice as fast in NHWC, ~5-20% less time per update at 84x84x4 (see
        # benchmarks/README.md). Same values to float rounding. CUDA keeps the default layout (not measured).
        self._memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        torch.manual_seed(seed)
        self.critic = Critic(enc(), state_dim, spec.action_dim, cfg.hidden_dim, cfg.hidden_layers, cfg.num_critics)
        self.actor = Actor(None if self.shared else enc(), cfg.features_dim, state_dim, spec.action_dim,
                           cfg.hidden_dim, cfg.hidden_layers)
        for net in (self.critic, self.actor):  # in place (Module.to returns the module itself)
            # torch's stubs leave memory_format out of Module.to's overloads; Module.to accepts it
            net.to(device, memory_format=self._memory_format)  # type: ignore[call-overload]
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.actor_opt = _optimizer(list(self.actor.parameters()), cfg.lr.actor, cfg)
        self.critic_opt = _optimizer(list(self.critic.parameters()), cfg.lr.critic, cfg)
        self._online: list[torch.Tensor] = [*self.actor.parameters(), *self.critic.parameters()]
        self._target: list[torch.Tensor] = [*self.actor_target.parameters(), *self.critic_target.parameters()]
        parts = {"actor": self.actor.parts(), "critic": self.critic.parts()}
        # agent.clip.mode: one strategy per net owns its clip (av_td3/agent/clipping.py); the monitor only measures
        self.clippers: dict[str, ClipStrategy] = {
            net: make_clipper(cfg.clip, net, [p for ps in net_parts.values() for p in ps], device)
            for net, net_parts in parts.items()}
        self.monitor = GradMonitor(monitor_cfg, cfg.clip, parts, q_bound, spec.action_names, device)
        self._noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        self._augment = augment.make(cfg.augment, cfg.augment_pad, device, seed + 2)  # own stream: see update
        self.critic_updates = 0
        self.actor_updates = 0
        # an attribute, not a method, so that agent.compile can put the compiled function in its place
        self._encode: Callable[[Encoder, torch.Tensor], torch.Tensor] = self._encode_eager
        if cfg.compile:
            self._encode = torch.compile(self._encode_eager)

    # ------------------------------------------------------------------------------------------------- helpers
    def _images(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, stack, H, W] (any strides) → floats in [0, 1] in the nets' memory format, once per
        batch, on the training device."""
        image = image.to(self.device, non_blocking=True)
        if self._memory_format is torch.channels_last:
            # NCHW → NHWC by stacking the frame planes along a new last axis, on the uint8 bytes: torch's strided
            # copy (what .to(memory_format=channels_last) does) took several times longer at [128, 4, 64, 64] on
            # the 2-core VM (benchmarks/README.md). Same values, same strides as that conversion.
            return torch.stack(image.unbind(1), dim=-1).to(torch.float32).div_(255.0).permute(0, 3, 1, 2)
        return image.to(dtype=torch.float32, memory_format=self._memory_format).div_(255.0)

    def _states(self, state: torch.Tensor) -> torch.Tensor:
        if not self.cfg.use_state:
            return state.new_zeros(state.shape[0], 0, device=self.device)
        return state.to(self.device, non_blocking=True) * self._state_scale

    def _encode_eager(self, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
        """Images [B, stack, H, W] → float32 features [B, features_dim]; under ``agent.precision=bf16`` the
        encoder runs in bfloat16 autocast (its backward follows the forward's dtypes)."""
        if self.cfg.precision == "fp32":
            return encoder(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return encoder(images).float()

    def parts(self) -> dict[str, dict[str, list[str]]]:
        """Which named parameters each optimizer owns, per part (logged at start-up)."""
        names = {id(p): n for net in (self.actor, self.critic) for n, p in net.named_parameters()}
        return {net: {part: [names[id(p)] for p in ps] for part, ps in m.parts().items()}
                for net, m in (("actor", self.actor), ("critic", self.critic))}

    # ----------------------------------------------------------------------------------------------------- act
    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], noise: float = 0.0) -> np.ndarray:
        """Policy action for a batch of observations (image uint8 [n, stack, H, W], state [n, k]) → [n, a].
        ``noise`` is the std of Gaussian exploration noise (0 for evaluation)."""
        images = self._images(torch.as_tensor(obs["image"]))
        states = self._states(torch.as_tensor(obs["state"]))
        encoder = self.critic.encoder if self.shared else _own_encoder(self.actor)
        action = self.actor(self._encode(encoder, images), states)
        if noise > 0:
            action = action + noise * torch.randn(action.shape, generator=self._noise_gen, device=self.device)
        return action.clamp(-1.0, 1.0).cpu().numpy()

    # -------------------------------------------------------------------------------------------------- update
    def update(self, batch, step: int) -> None:
        """One critic update and, every ``policy_freq`` critic updates, one actor + target update.
        Metrics are aggregated on the device by ``self.monitor``; nothing here waits on the device except the
        one finiteness check per network update (the guard)."""
        cfg, mon = self.cfg, self.monitor
        frames, next_frames = batch.obs_image, batch.next_image  # uint8 [B, stack, H, W]
        if self._augment is not None:  # agent.augment: the update's frames only, never act()'s; on uint8 (cheaper)
            frames, next_frames = self._augment(frames), self._augment(next_frames)
        images, next_images = self._images(frames), self._images(next_frames)
        states, next_states = self._states(batch.obs_state), self._states(batch.next_state)
        action = batch.action.to(self.device, non_blocking=True)
        reward = batch.reward.to(self.device, non_blocking=True)
        not_done = 1.0 - batch.done.to(self.device, non_blocking=True)
        # an n-step batch (agent.n_step) carries gamma ** m for its m-step rewards; a one-step batch uses gamma
        discount = cfg.gamma if batch.discount is None else batch.discount.to(self.device, non_blocking=True)

        # --- critic target: y = r + gamma * (1 - terminated) * min_i Q'_i(s', pi'(s') + clipped noise)
        with torch.no_grad():
            next_critic_features = self._encode(self.critic_target.encoder, next_images)
            next_actor_features = (next_critic_features if self.shared
                                   else self._encode(_own_encoder(self.actor_target), next_images))
            next_action = self.actor_target(next_actor_features, next_states)
            if cfg.policy_noise > 0:  # target policy smoothing
                noise = torch.randn(next_action.shape, generator=self._noise_gen, device=self.device)
                noise = (noise * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
                next_action = (next_action + noise).clamp(-1.0, 1.0)
            target_q = torch.stack(self.critic_target(next_critic_features, next_states, next_action)).min(0).values
            y = reward + discount * not_done * target_q

        # --- critic step (the critic's CNN and MLP in one optimizer, clipped together)
        features = self._encode(self.critic.encoder, images)
        qs = self.critic(features, states, action)
        critic_loss = sum(F.mse_loss(q, y) for q in qs)
        assert isinstance(critic_loss, torch.Tensor)  # a tensor, not sum()'s start 0: num_critics >= 1
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        norms = mon.before_clip("critic", critic_loss, step)  # None: non-finite, the update is dropped (guard)
        if norms is not None:
            clip = self.clippers["critic"].clip(norms.total)  # THE CLIP: scales the gradients in place
            mon.after_clip("critic", norms, clip)
            self.critic_opt.step()
        self.critic_updates += 1
        mon.observe("train/critic_loss", critic_loss)
        mon.observe("train/q1", qs[0].mean())
        if len(qs) > 1:
            mon.observe("train/q2", qs[1].mean())
        mon.observe("train/q_abs", torch.stack([q.abs().max() for q in qs]).max())

        # --- delayed actor step and target update, every policy_freq critic updates
        if self.critic_updates % cfg.policy_freq != 0:
            return
        actor_features = features.detach() if self.shared else self._encode(_own_encoder(self.actor), images)
        policy_action = self.actor(actor_features, states)
        actor_loss = -self.critic.q1(features.detach(), states, policy_action).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        norms = mon.before_clip("actor", actor_loss, step)
        if norms is None:
            return
        clip = self.clippers["actor"].clip(norms.total)  # THE CLIP
        mon.after_clip("actor", norms, clip)
        self.actor_opt.step()
        self.actor_updates += 1
        mon.observe("train/actor_loss", actor_loss)
        mon.observe("train/action_saturation",
                    (policy_action.detach().abs() > mon.cfg.saturation_level).float().mean(0))
        with torch.no_grad():  # Polyak averaging of every target parameter in one multi-tensor op
            torch._foreach_lerp_(self._target, self._online, cfg.tau)

    def flush(self, step: int) -> Flush:
        """The monitor's metrics since the last flush (one host transfer); nothing before the first update."""
        return self.monitor.flush(step) if self.critic_updates > 0 else Flush({})

    def health(self) -> Health:
        return Health(dict(self.monitor.alert_counts), self.monitor.skipped_updates)

    def reset(self, env_ids: np.ndarray) -> None:
        """New episodes start in these envs; the policy keeps no per-episode state."""

    def for_evaluation(self) -> "TD3":
        """The policy evaluation acts with (acting is stateless, so this agent itself)."""
        return self

    def check_action(self, action: np.ndarray, step: int) -> np.ndarray:
        """Guard: a non-finite action never reaches the simulator."""
        if np.all(np.isfinite(action)):
            return action
        if self.monitor.cfg.nan_policy == "stop":
            raise NonFiniteError("policy action", step)
        self.monitor.nonfinite_actions += 1
        return np.zeros_like(action)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "critic_updates": self.critic_updates, "actor_updates": self.actor_updates,
                "noise_gen": self._noise_gen.get_state(), "monitor": self.monitor.state_dict(),
                "clip": {net: c.state_dict() for net, c in self.clippers.items()},
                "augment": None if self._augment is None else self._augment.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.actor.load_state_dict(d["actor"])
        self.critic.load_state_dict(d["critic"])
        self.actor_target.load_state_dict(d["actor_target"])
        self.critic_target.load_state_dict(d["critic_target"])
        self.actor_opt.load_state_dict(d["actor_opt"])
        self.critic_opt.load_state_dict(d["critic_opt"])
        self.critic_updates = d["critic_updates"]
        self.actor_updates = d["actor_updates"]
        self._noise_gen.set_state(d["noise_gen"])
        if self._augment is not None and d.get("augment") is not None:  # absent from checkpoints without it
            self._augment.load_state_dict(d["augment"])
        # the clip state, checked to fit this run's clip settings; until 2026-12-06 the monitor kept it
        clip = d["clip"] if "clip" in d else d["monitor"]["clip"]
        for net, clipper in self.clippers.items():
            clipper.load_state_dict(clip[net])
        self.monitor.load_state_dict(d["monitor"])
