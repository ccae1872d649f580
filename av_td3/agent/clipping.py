"""Clip modes (``agent.clip.mode``): where each update's clip limit for one network comes from.

Every mode clips the same thing — the network's global L2 gradient norm over its CNN and MLP together, the
norm :class:`~av_td3.agent.monitor.GradMonitor` measures — and differs only in the limit:

* ``norm``: a fixed limit (``agent.clip.actor`` / ``agent.clip.critic``);
* ``adaptive`` (AutoClip, Seetharaman et al. 2020): the ``agent.clip.percentile``-th percentile of the network's
  last ``agent.clip.window`` before-clip norms, the current one included;
* ``zscore`` (ZClip, 2025): mean + ``z`` * std of an EMA of the network's norms; a norm above it is clipped to
  it, and the EMA is fed the clipped norm so that a spike does not raise the limit for the next one.

The adaptive modes use the fixed limit for the first ``agent.clip.warmup`` updates, while their history fills.
A network whose fixed limit is null is not clipped in any mode. Limits are computed on the training device with
no host synchronisation (the update count that decides the warm-up is a Python int).
"""

from __future__ import annotations

import torch

from av_td3.config import ClipConfig

EPS = 1e-6  # as in torch.nn.utils.clip_grads_with_norm_: coef = limit / (norm + EPS)


class ClipLimit:
    """The limit of one network: :meth:`__call__` takes this update's before-clip norm (a 0-d tensor) and
    returns the limit to clip it to: a float (fixed), a 0-d tensor (adaptive), or None (not clipped)."""

    def __call__(self, norm: torch.Tensor) -> float | torch.Tensor | None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class NoClip(ClipLimit):
    def __call__(self, norm: torch.Tensor) -> None:
        return None


class FixedNorm(ClipLimit):
    def __init__(self, limit: float) -> None:
        self.limit = float(limit)

    def __call__(self, norm: torch.Tensor) -> float:
        return self.limit


class Percentile(ClipLimit):
    """AutoClip: the limit is a percentile of the last ``window`` norms (a ring buffer on the device)."""

    def __init__(self, warmup_limit: float, percentile: float, window: int, warmup: int,
                 device: torch.device) -> None:
        self.warmup_limit, self.q, self.warmup = float(warmup_limit), percentile / 100.0, warmup
        self.history = torch.zeros(window, device=device)
        self.seen = 0  # norms recorded so far (host counter: no sync to know how much of the ring is filled)

    def __call__(self, norm: torch.Tensor) -> float | torch.Tensor:
        window = self.history.numel()
        self.history[self.seen % window] = norm.detach()
        self.seen += 1
        if self.seen <= self.warmup:
            return self.warmup_limit
        return torch.quantile(self.history[:min(self.seen, window)], self.q)

    def state_dict(self) -> dict:
        return {"history": self.history.cpu(), "seen": self.seen}

    def load_state_dict(self, d: dict) -> None:
        self.history.copy_(d["history"])
        self.seen = int(d["seen"])


class RunningThreshold:
    """mean + z * std of a stream of scalars, on the device: the plain mean and variance of the first ``warmup``
    values (Welford), then EMAs (weight ``ema`` on the old value) fed each value capped at the threshold it was
    judged against, so that an outlier does not raise the threshold for the next one (ZClip's rule)."""

    def __init__(self, z: float, ema: float, warmup: int, device: torch.device) -> None:
        self.z, self.ema, self.warmup = z, ema, warmup
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)  # Welford's sum of squared deviations until the warm-up ends
        self.seen = 0  # values so far (a host counter: no sync to know the phase)

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        """Record ``x`` (a 0-d tensor); return the threshold it was judged against, None during the warm-up."""
        x = x.detach().float()
        self.seen += 1
        if self.seen <= self.warmup:
            delta = x - self.mean
            self.mean += delta / self.seen
            self.var += delta * (x - self.mean)
            if self.seen == self.warmup:
                self.var /= self.seen
            return None
        threshold = self.mean + self.z * self.var.clamp_min(0).sqrt()
        delta = torch.minimum(x, threshold) - self.mean
        self.mean += (1 - self.ema) * delta
        self.var.mul_(self.ema).add_(self.ema * (1 - self.ema) * delta * delta)
        return threshold

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "seen": self.seen}

    def load_state_dict(self, d: dict) -> None:
        self.mean.copy_(d["mean"])
        self.var.copy_(d["var"])
        self.seen = int(d["seen"])


class ZScore(ClipLimit):
    """ZClip: limit = mean + z * std of the norms (:class:`RunningThreshold`); the fixed limit in the warm-up."""

    def __init__(self, warmup_limit: float, z: float, ema: float, warmup: int, device: torch.device) -> None:
        self.warmup_limit = float(warmup_limit)
        self.stats = RunningThreshold(z, ema, warmup, device)

    def __call__(self, norm: torch.Tensor) -> float | torch.Tensor:
        limit = self.stats.update(norm)
        return self.warmup_limit if limit is None else limit

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.stats.load_state_dict(d)


def make_limit(clip: ClipConfig, net: str, device: torch.device) -> ClipLimit:
    """The :class:`ClipLimit` of ``net`` ("actor" | "critic") under ``clip`` (``agent.clip``)."""
    fixed = getattr(clip, net)
    if fixed is None:
        return NoClip()
    if clip.mode == "norm":
        return FixedNorm(fixed)
    if clip.mode == "adaptive":
        return Percentile(fixed, clip.percentile, clip.window, clip.warmup, device)
    if clip.mode == "zscore":
        return ZScore(fixed, clip.z, clip.ema, clip.warmup, device)
    raise ValueError(f"agent.clip.mode={clip.mode!r}: choose norm, adaptive or zscore")


def clip_to(grads: list[torch.Tensor], limit: float | torch.Tensor, norm: torch.Tensor) -> None:
    """Scale ``grads`` in place so that their global norm ``norm`` becomes at most ``limit``.

    The formula of ``torch.nn.utils.clip_grads_with_norm_`` (bit-identical for a float limit), which cannot take
    a tensor limit itself: it calls ``float()`` on it, a host sync per update."""
    if not grads:
        return
    coef = torch.clamp(limit / (norm + EPS), max=1.0)
    torch._foreach_mul_(grads, coef)
