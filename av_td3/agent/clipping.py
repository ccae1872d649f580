"""Clip strategies (``agent.clip.mode``): one object per network owns that network's clip.

:meth:`TD3.update <av_td3.agent.td3.TD3.update>` calls ``clippers[net].clip(norm)`` between ``loss.backward()``
and ``optimizer.step()``: the strategy scales the net's gradients in place and returns a :class:`Clip` record of
what it did, which :class:`~av_td3.agent.monitor.GradMonitor` checks against the norms it measures after the clip.

Global-norm modes clip the network's global L2 gradient norm over its CNN and MLP together (the ``total`` norm
the monitor measures before the clip) and differ only in the limit:

* ``norm``: a fixed limit (``agent.clip.actor`` / ``agent.clip.critic``);
* ``adaptive`` (AutoClip, Seetharaman et al. 2020): the ``agent.clip.percentile``-th percentile of the network's
  last ``agent.clip.window`` before-clip norms, the current one included;
* ``zscore`` (ZClip, Kumar et al. 2025): from EMA statistics of the network's norms, see :class:`ZScore`.

The per-unit mode:

* ``agc`` (adaptive gradient clipping, Brock et al. 2021): each unit's gradient norm is clipped to
  ``agent.clip.agc`` x max(the unit's weight norm, 1e-3), see :class:`AGC`. It has no global limit.

The adaptive modes use the fixed limit until their history holds ``agent.clip.warmup`` norms. A network whose fixed
limit is null is not clipped in any mode, ``agc`` included. Limits are computed on the training device with no
host synchronisation (a host counter or a device-side ``torch.where`` decides the warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from av_td3.config import ClipConfig, ConfigError

EPS = 1e-6  # as in torch.nn.utils.clip_grads_with_norm_: coef = limit / (norm + EPS)
# ZClip: the limit never falls below this fraction of the net's fixed (warm-up) limit. The fixed limits sit near
# the 90th percentile of a healthy net's norms (ClipConfig), so 1% of one is about two orders of magnitude below
# them and never binds there; what it stops is a limit that has shrunk to nothing, which would clip every later
# gradient to ~0 and keep the net from ever moving again.
ZSCORE_FLOOR = 0.01
ZSCORE_EPS = 1e-6  # z = (norm - mean) / (std + eps), as in the official ZClip code
# AGC: a weight norm below this counts as this, so a unit whose weights are (near) zero, such as a bias
# initialised to 0, can still move (Brock et al. 2021 and DreamerV3 both use 1e-3).
AGC_EPS = 1e-3


@dataclass(frozen=True)
class Clip:
    """What one clip did, for the monitor to check against the norms it measures after it.

    ``limit``: 0-d; the limit the global norm was clipped to, or under ``agc`` the largest global norm the
    per-unit limits allow, sqrt(sum of unit limits^2). ``clipped``: 0-d in [0, 1], the share of units clipped (a
    global-norm mode has one unit, the whole net: 0 or 1). Under ``agc`` only: ``unit_limits`` [units], each
    unit's limit, for the units of ``grads`` in order (rows of a tensor of 2+ dims, a 1-D tensor as one)."""
    limit: torch.Tensor
    clipped: torch.Tensor
    unit_limits: torch.Tensor | None = None
    grads: tuple[torch.Tensor, ...] = ()


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norms [units] of a parameter's (or gradient's) units: over all dims but the first for 2+ dims (a
    linear layer's output rows, a conv's output filters), the whole tensor as one unit for 1-D (a bias, a norm
    scale, as NFNets' reference code does)."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t).reshape(1)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)))


def clip_to(grads: list[torch.Tensor], limit: float | torch.Tensor, norm: torch.Tensor) -> None:
    """Scale ``grads`` in place so that their global norm ``norm`` becomes at most ``limit``.

    The formula of ``torch.nn.utils.clip_grads_with_norm_`` (bit-identical), which cannot take a tensor limit
    itself: it calls ``float()`` on it, a host sync per update."""
    if not grads:
        return
    coef = torch.clamp(limit / (norm + EPS), max=1.0)
    torch._foreach_mul_(grads, coef)


class ClipStrategy:
    """Owns the clip of one network (``net``: "actor" | "critic") over its parameters ``params`` (CNN and MLP)."""

    mode = ""  # the agent.clip.mode it implements

    def __init__(self, net: str, params: list[nn.Parameter]) -> None:
        self.net = net
        self.params = params

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def clip(self, norm: torch.Tensor) -> Clip | None:
        """Clip the gradients in place, given their global before-clip norm ``norm`` (0-d, measured by the
        monitor); return what was done, None when this net is not clipped."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        self._check_fits(d)

    def settings(self) -> str:
        """The clip settings this strategy stands for, as the key to set (named in errors)."""
        return f"agent.clip.mode={self.mode}"

    def _check_fits(self, d: dict) -> None:
        """Refuse a checkpoint's clip state made for another mode, or with this net's clipping on where it is off
        here (or the reverse): the state would not fit."""
        if set(d) != set(self.state_dict()):
            raise ConfigError(
                f"the checkpoint's clip state of the {self.net} was not made under {self.settings()}: it was "
                f"written under another agent.clip.mode, or with agent.clip.{self.net} null where it is set here "
                "(or the reverse). Resume with the clip settings it was made with, or start fresh with "
                "trainer.resume=none in a new output dir.")


class NoClip(ClipStrategy):
    """``agent.clip.<net>=null``: the net is not clipped, in every mode."""

    def clip(self, norm: torch.Tensor) -> None:
        return None

    def settings(self) -> str:
        return f"agent.clip.{self.net}=null"


class GlobalNorm(ClipStrategy):
    """A global-norm mode: :meth:`limit` says this update's limit, the clip scales every gradient by
    min(1, limit / (norm + 1e-6))."""

    def limit(self, norm: torch.Tensor) -> torch.Tensor:
        """This update's limit (0-d, on the device) for the before-clip norm ``norm``; records it where the mode
        keeps a history."""
        raise NotImplementedError

    def clip(self, norm: torch.Tensor) -> Clip:
        limit = self.limit(norm)
        clip_to(self.grads(), limit, norm)
        return Clip(limit=limit, clipped=(norm > limit).float())


class FixedNorm(GlobalNorm):
    mode = "norm"

    def __init__(self, net: str, params: list[nn.Parameter], limit: float, device: torch.device) -> None:
        super().__init__(net, params)
        self._limit = torch.tensor(float(limit), device=device)  # made once: no host-to-device copy per update

    def limit(self, norm: torch.Tensor) -> torch.Tensor:
        return self._limit


class Percentile(GlobalNorm):
    """AutoClip: the limit is a percentile of the last ``window`` norms (a ring buffer on the device)."""

    mode = "adaptive"

    def __init__(self, net: str, params: list[nn.Parameter], warmup_limit: float, percentile: float, window: int,
                 warmup: int, device: torch.device) -> None:
        super().__init__(net, params)
        self.warmup_limit = torch.tensor(float(warmup_limit), device=device)
        self.q, self.warmup = percentile / 100.0, warmup
        self.history = torch.zeros(window, device=device)
        self.seen = 0  # norms recorded so far (host counter: no sync to know how much of the ring is filled)

    def limit(self, norm: torch.Tensor) -> torch.Tensor:
        window = self.history.numel()
        self.history[self.seen % window] = norm.detach()
        self.seen += 1
        if self.seen <= self.warmup:
            return self.warmup_limit
        return torch.quantile(self.history[:min(self.seen, window)], self.q)

    def state_dict(self) -> dict:
        return {"history": self.history.cpu(), "seen": self.seen}

    def load_state_dict(self, d: dict) -> None:
        self._check_fits(d)
        if d["history"].shape != self.history.shape:
            raise ConfigError(f"the checkpoint's AutoClip history of the {self.net} holds {d['history'].numel()} "
                              f"norms, not agent.clip.window={self.history.numel()}: resume with "
                              f"agent.clip.window={d['history'].numel()}, or start fresh with trainer.resume=none "
                              "in a new output dir.")
        self.history.copy_(d["history"])
        self.seen = int(d["seen"])


class ZScore(GlobalNorm):
    """ZClip: z = (norm - mean) / (std + 1e-6) against EMA statistics of the net's earlier norms; a norm with
    z > ``z`` (``agent.clip.z``) is clipped, to (``agent.clip.zscore_scaling``):

    * ``adaptive`` (the official code's default ``clip_option="adaptive_scaling"``): mean + (z_thresh^2 / z) * std,
      the further out the norm, the harder the clip;
    * ``threshold`` (what this project ran until 2026-12-06; the official code's ``mode="percentile"``): the
      threshold itself, mean + z_thresh * std.

    The limit logged on an update that is not clipped is the threshold mean + z_thresh * std, which the norm is
    below. As in the official code, the EMAs (weight ``ema`` on the old value) are fed the norm *after* the clip,
    so a spike does not raise the limit for the next one; they start from the plain mean and variance of the
    first ``warmup`` norms (Welford), during which the fixed limit applies. Unlike the official code, a zero or
    non-finite norm is not recorded (a dead net's zeros would drag the statistics to nothing) and the limit never
    falls below ``ZSCORE_FLOOR`` x the fixed limit; and the variance is the standard exponentially weighted one,
    ema * (var + (1 - ema) * d^2) with d the fed norm minus the old mean, where the official code's
    ema * var + (1 - ema) * (norm - new mean)^2 weighs d^2 by a further factor ema (kept as this project ran it).
    All of it on the device, phase included (``torch.where``).
    """

    mode = "zscore"

    def __init__(self, net: str, params: list[nn.Parameter], warmup_limit: float, z: float, ema: float,
                 warmup: int, scaling: str, device: torch.device) -> None:
        super().__init__(net, params)
        self.warmup_limit = torch.tensor(float(warmup_limit), device=device)
        self.floor = ZSCORE_FLOOR * float(warmup_limit)
        self.z, self.ema, self.warmup, self.scaling = z, ema, warmup, scaling
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)  # Welford's sum of squared deviations until the warm-up ends
        self.count = torch.zeros((), device=device)  # norms recorded in the warm-up (stops at `warmup`)

    def limit(self, norm: torch.Tensor) -> torch.Tensor:
        x = norm.detach().float()
        warm = self.count < self.warmup
        std = self.var.clamp_min(0).sqrt()
        factor: torch.Tensor | float = self.z  # threshold: clip to mean + z_thresh * std
        if self.scaling == "adaptive":
            z = (x - self.mean) / (std + ZSCORE_EPS)
            factor = torch.where(z > self.z, self.z ** 2 / z, self.z)
        limit = torch.where(warm, self.warmup_limit, (self.mean + factor * std).clamp_min(self.floor))
        self._record(x, limit, warm)
        return limit

    def _record(self, x: torch.Tensor, limit: torch.Tensor, warm: torch.Tensor) -> None:
        keep = torch.isfinite(x) & (x > 0)
        count = self.count + keep.float()
        # warm-up: Welford's running mean and sum of squared deviations; the last warm-up norm turns it to a variance
        delta = x - self.mean
        w_mean = self.mean + delta / count.clamp_min(1)
        w_var = self.var + delta * (x - w_mean)
        w_var = torch.where(count == self.warmup, w_var / count.clamp_min(1), w_var)
        # after it: exponentially weighted mean and variance, fed the norm as clipped
        d = torch.minimum(x, limit) - self.mean
        e_mean = self.mean + (1 - self.ema) * d
        e_var = self.ema * (self.var + (1 - self.ema) * d * d)
        self.mean = torch.where(keep, torch.where(warm, w_mean, e_mean), self.mean)
        self.var = torch.where(keep, torch.where(warm, w_var, e_var), self.var)
        self.count = torch.where(warm, count, self.count)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, d: dict) -> None:
        if set(d) == {"mean", "var", "seen"}:  # written until 2026-12-06: every norm counted, on the host
            d = {"mean": d["mean"], "var": d["var"], "count": torch.tensor(float(min(d["seen"], self.warmup)))}
        self._check_fits(d)
        device = self.mean.device
        self.mean, self.var, self.count = (d[k].to(device, torch.float32) for k in ("mean", "var", "count"))


class AGC(ClipStrategy):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021): each unit's gradient G_u is scaled by
    min(1, lambda * max(||W_u||, 1e-3) / (||G_u|| + 1e-6)), lambda = ``agent.clip.agc``, W_u the unit's current
    weights. Units (:func:`unit_norms`): the output rows of every weight of 2+ dims (linear rows, conv filters);
    a 1-D parameter (bias, LayerNorm scale) is one unit, as in NFNets' reference code (elementwise units would
    pin a zero-initialised bias to steps of lambda * 1e-3). DreamerV3 clips whole tensors instead, with the same
    lambda 0.3 and floor 1e-3. Stateless; the global norm is not used."""

    mode = "agc"

    def __init__(self, net: str, params: list[nn.Parameter], lam: float) -> None:
        super().__init__(net, params)
        self.lam = lam

    @torch.no_grad()
    def clip(self, norm: torch.Tensor) -> Clip:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]  # all of params'; the test only narrows the type
        limits = self.lam * torch.cat([unit_norms(p) for p in params]).clamp_min(AGC_EPS)
        g_norms = torch.cat([unit_norms(g) for g in grads])
        coef = torch.clamp(limits / (g_norms + EPS), max=1.0)
        for g, c in zip(grads, coef.split([1 if g.ndim <= 1 else g.shape[0] for g in grads])):
            g.mul_(c.reshape((-1,) + (1,) * (g.ndim - 1)))  # one factor per unit, broadcast over its entries
        return Clip(limit=torch.linalg.vector_norm(limits), clipped=(g_norms > limits).float().mean(),
                    unit_limits=limits, grads=tuple(grads))


def make_clipper(clip: ClipConfig, net: str, params: list[nn.Parameter], device: torch.device) -> ClipStrategy:
    """The :class:`ClipStrategy` of ``net`` ("actor" | "critic", parameters ``params``) under ``clip``
    (``agent.clip``)."""
    fixed = getattr(clip, net)
    if fixed is None:
        return NoClip(net, params)
    if clip.mode == "norm":
        return FixedNorm(net, params, fixed, device)
    if clip.mode == "adaptive":
        return Percentile(net, params, fixed, clip.percentile, clip.window, clip.warmup, device)
    if clip.mode == "zscore":
        return ZScore(net, params, fixed, clip.z, clip.ema, clip.warmup, clip.zscore_scaling, device)
    if clip.mode == "agc":
        return AGC(net, params, clip.agc)
    raise ValueError(f"agent.clip.mode={clip.mode!r}: choose norm, adaptive, zscore or agc")
