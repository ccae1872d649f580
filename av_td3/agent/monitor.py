"""The measurement of gradients and of what clipping did, alerts and numerical guards.

The clip itself belongs to each network's :class:`~av_td3.agent.clipping.ClipStrategy` (``agent.clip.mode``),
called by the TD3 update between :meth:`GradMonitor.before_clip` and :meth:`GradMonitor.after_clip`; the monitor
only measures. For each network ("actor", "critic") and part ("cnn", "mlp", "total"):

* norms are global L2 norms of that part's gradients (``torch.nn.utils.get_total_norm``); ``total`` is the L2
  norm of the part norms, i.e. the norm over exactly the parameter set that is clipped;
* the before-clip norm is measured before clipping, the after-clip norm after clipping, on the same backward;
* a network is observed only on updates where it is actually updated (the delayed actor is not padded with 0);
* the limit each update was clipped to is logged as used (``grad/<net>/clip_limit``), with the invariant after-clip
  norm <= limit checked every update: on the global norm in the global-norm modes, on every unit under ``agc``;
* gradient spikes are judged against the net's own history (log-norm above its EMA mean by ``monitor.spike_z``
  EMA std), so a large but steady norm is not a spike;
* every update is aggregated on the training device (mean and max per interval, update count, clipped count,
  the interval's norms for percentiles); :meth:`GradMonitor.flush` moves everything to the host in ONE transfer
  and evaluates the alerts there.

Alert thresholds follow the configuration (clip limits, ``monitor.*``, the reward scale), never fixed numbers.
The tag names, the percentiles and the alerts (with their severity and explanation) are :mod:`av_td3.tags`'s.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import nn

from av_td3 import tags
from av_td3.agent.base import Flush
from av_td3.agent.clipping import Clip, unit_norms
from av_td3.config import ClipConfig, MonitorConfig
from av_td3.tags import AFTER, ALERTS, BEFORE, NORM_PERCENTILES

log = logging.getLogger(__name__)


class ClipRow(NamedTuple):
    """What one update's clip did, accumulated per interval (mean and max of each field)."""
    coef: torch.Tensor     # after / before total norm (1 when the norm is 0)
    clipped: torch.Tensor  # 1 when the clip bound (under agc: the share of units clipped)
    spike: torch.Tensor    # 1 when the before-clip norm was a spike (SpikeDetector)


class LimitRow(NamedTuple):
    """The limit one update was clipped to and the invariant's ratio, accumulated per interval."""
    limit: torch.Tensor  # the limit used
    ratio: torch.Tensor  # after-clip norm / limit (agc: the worst unit's); the invariant is ratio <= 1


_ACC = "grad/"


def _acc(net: str, what: str) -> str:
    """The key of one of a net's device accumulators (checkpointed with the interval in progress; these are not
    tags: :meth:`GradMonitor.flush` turns them into the :mod:`av_td3.tags` names)."""
    return f"{_ACC}{net}/{what}"


class NonFiniteError(RuntimeError):
    """A loss, gradient norm or action went non-finite under ``monitor.nan_policy=stop``."""

    def __init__(self, quantity: str, step: int) -> None:
        super().__init__(f"non-finite {quantity} at env step {step}")
        self.quantity = quantity
        self.step = step


class DeviceStats:
    """Mean/max accumulators that live on the device; reading them is one host transfer for all keys."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sum: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        """Add one observation (a 0-d or 1-d tensor; 1-d entries are tracked element-wise)."""
        value = value.detach()
        if key in self._sum:
            self._sum[key] += value
            torch.maximum(self._max[key], value, out=self._max[key])
            self._count[key] += 1
        else:
            self._sum[key] = value.clone().to(torch.float32)
            self._max[key] = value.clone().to(torch.float32)
            self._count[key] = 1

    def count(self, key: str) -> int:
        return self._count.get(key, 0)

    def tensors(self) -> list[tuple[str, str, torch.Tensor]]:
        """(key, 'mean'|'max', tensor) for everything accumulated, means still on the device."""
        out = []
        for key, total in self._sum.items():
            out.append((key, "mean", total / self._count[key]))
            out.append((key, "max", self._max[key]))
        return out

    def state_dict(self) -> dict:
        return {"sum": {k: v.cpu() for k, v in self._sum.items()}, "max": {k: v.cpu() for k, v in self._max.items()},
                "count": dict(self._count)}

    def load_state_dict(self, d: dict) -> None:
        self._sum = {k: v.to(self.device) for k, v in d["sum"].items()}
        self._max = {k: v.to(self.device) for k, v in d["max"].items()}
        self._count = dict(d["count"])

    def reset(self) -> None:
        self._sum.clear()
        self._max.clear()
        self._count.clear()


class Norms(NamedTuple):
    """One update's before-clip norms of a net: ``parts`` [n_parts] (None with ``monitor.enabled=false``) and
    ``total`` (0-d), the global norm a global-norm clip scales."""
    parts: torch.Tensor | None
    total: torch.Tensor


class RunningThreshold:
    """mean + z * std of a stream of scalars, on the device: the plain mean and variance of the first ``warmup``
    values (Welford), then EMAs (weight ``ema`` on the old value) fed each value capped at the threshold it was
    judged against, so that an outlier does not raise the threshold for the next one."""

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


class SpikeDetector:
    """Spikes of one net's before-clip norm against its own history, on the device: an update is a spike when
    log(norm) exceeds mean + z * std of the net's earlier log norms (:class:`RunningThreshold`, after ``warmup``
    updates). Scale-free: a norm 500x the clip limit but steady is no spike; a 50x jump over a steady norm is."""

    def __init__(self, z: float, ema: float, warmup: int, device: torch.device) -> None:
        self.stats = RunningThreshold(z, ema, warmup, device)

    def __call__(self, norm: torch.Tensor) -> torch.Tensor:
        """1.0 when this update's norm is a spike, else 0.0 (a 0-d tensor)."""
        x = torch.log(norm.detach().float().clamp_min(1e-30))
        threshold = self.stats.update(x)
        return torch.zeros_like(x) if threshold is None else (x > threshold).float()

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.stats.load_state_dict(d)


class GradMonitor:
    """Measures each network's gradients before and after its clip, and records what the clip did.

    ``parts`` maps net → part → parameters, e.g. ``{"actor": {"cnn": [...], "mlp": [...]}, "critic": {...}}``;
    a part with no parameters (the actor's CNN with a shared encoder) is left out of the tags, not logged as 0.
    ``clip`` (``agent.clip``) only words the alerts: the clip is the update's (:mod:`av_td3.agent.clipping`).
    """

    def __init__(self, cfg: MonitorConfig, clip: ClipConfig, parts: dict[str, dict[str, list[nn.Parameter]]],
                 q_bound: float, action_names: tuple[str, ...], device: torch.device) -> None:
        self.cfg = cfg
        self.per_unit = clip.mode == "agc"  # the clip's invariant holds per unit, not on the global norm
        self.parts = {net: {p: list(ps) for p, ps in np_.items() if len(ps) > 0} for net, np_ in parts.items()}
        self.params = {net: [p for ps in np_.values() for p in ps] for net, np_ in self.parts.items()}
        self.spikes = {net: SpikeDetector(cfg.spike_z, cfg.spike_ema, cfg.spike_warmup, device)
                       for net in self.parts}
        self.q_bound = q_bound
        self.thresholds = tags.Thresholds(self.per_unit, cfg.spike_z, q_bound, cfg.dead_steps,
                                          cfg.saturation_threshold)  # what the alerts' explanations quote
        self.action_names = action_names
        self.device = device
        self.stats = DeviceStats(device)
        self._zero_run = {net: torch.zeros(len(np_), device=device) for net, np_ in self.parts.items()}
        self._norms: dict[str, list[torch.Tensor]] = {net: [] for net in self.parts}  # this interval's totals
        self.alert_counts: dict[str, int] = {}
        self.skipped_updates = 0
        self.nonfinite_actions = 0

    # ------------------------------------------------------------------------------------------------ per update
    def _part_norms(self, net: str) -> torch.Tensor:
        """[n_parts] global L2 norms of each part's gradients, now."""
        return torch.stack([torch.nn.utils.get_total_norm(g, foreach=True) if g else torch.zeros((), device=self.device)
                            for g in ([p.grad for p in ps if p.grad is not None] for ps in self.parts[net].values())])

    def before_clip(self, net: str, loss: torch.Tensor, step: int) -> Norms | None:
        """Measure ``net``'s gradients after ``loss.backward()`` and guard them: return the before-clip norms
        (the clip reads their ``total``), or None when the update must be dropped (non-finite loss or norm under
        ``nan_policy=skip``; the gradients are cleared). Raises :class:`NonFiniteError` under ``stop``."""
        if not self.cfg.enabled:  # monitoring off: one norm over all gradients, for the guard and the clip
            total = torch.nn.utils.get_total_norm([p.grad for p in self.params[net] if p.grad is not None],
                                                  foreach=True)
            parts = None
        else:
            parts = self._part_norms(net)
            total = torch.linalg.vector_norm(parts)  # L2 norm of norms == norm over all clipped parameters
        # The one host sync of an update: the guard must know before optimizer.step() whether to step.
        if not bool(torch.isfinite(loss) & torch.isfinite(total)):
            self._non_finite(net, loss, total.reshape(1) if parts is None else parts, step)
            return None
        return Norms(parts, total)

    def after_clip(self, net: str, before: Norms, clip: Clip | None) -> None:
        """Measure ``net``'s gradients again after its clip (``clip``: what the clip did, None when the net is
        not clipped) on the same backward, and record before, after, the limit used and the invariant."""
        if before.parts is None:  # monitoring off
            return
        total = before.total
        if clip is None:
            after_norms, after_total = before.parts, total
            clipped = torch.zeros_like(total)
        else:
            # measured again, not inferred from the clip coefficient: a broken clip must show up here
            after_norms = self._part_norms(net)
            after_total = torch.linalg.vector_norm(after_norms)
            if clip.unit_limits is None:  # global-norm modes: the invariant on the global norm
                ratio = after_total.float() / clip.limit
            else:  # agc: on every unit; the ratio logged is the worst unit's
                ratio = (torch.cat([unit_norms(g) for g in clip.grads]) / clip.unit_limits).max()
            # the invariant after <= limit is checked on the interval's max of the ratio
            self.stats.add(_acc(net, "limit"), torch.stack(LimitRow(limit=clip.limit.float(), ratio=ratio)))
            clipped = clip.clipped
        self.stats.add(_acc(net, BEFORE), torch.cat([before.parts, total.reshape(1)]))
        self.stats.add(_acc(net, AFTER), torch.cat([after_norms, after_total.reshape(1)]))
        coef = torch.where(total > 0, after_total / total, torch.ones_like(total))
        row = ClipRow(coef=coef, clipped=clipped, spike=self.spikes[net](total))
        self.stats.add(_acc(net, "coef"), torch.stack(row))
        self._norms[net].append(total.detach())
        zr = self._zero_run[net]
        torch.where(before.parts == 0, zr + 1, torch.zeros_like(zr), out=zr)
        self.stats.add(_acc(net, "zero_run"), zr)

    def observe(self, key: str, value: torch.Tensor) -> None:
        """Record a training quantity (loss, Q statistics, action saturation); mean and max per interval."""
        self.stats.add(key, value)

    def _non_finite(self, net: str, loss: torch.Tensor, part_norms: torch.Tensor, step: int) -> None:
        """The guard's verdict on a non-finite update: raise under ``stop``; under ``skip`` count it, say so and
        clear the net's gradients."""
        if not math.isfinite(loss.item()):
            quantity = f"{net} loss"
        else:
            names = list(self.parts[net]) if len(part_norms) == len(self.parts[net]) else ["total"]
            bad = [p for p, n in zip(names, part_norms.tolist()) if not math.isfinite(n)]
            quantity = f"{net} gradient norm ({', '.join(bad)})"
        if self.cfg.nan_policy == "stop":
            raise NonFiniteError(quantity, step)
        self.skipped_updates += 1
        log.warning("guard: skipped an update with non-finite %s at step %d (monitor.nan_policy=skip)",
                    quantity, step)
        for p in self.params[net]:
            p.grad = None

    # ------------------------------------------------------------------------------------------------- per flush
    def flush(self, step: int) -> Flush:
        """Turn the interval's device accumulators into scalars (one host transfer) and evaluate the alerts."""
        items = self.stats.tensors()  # a new list: the percentile rows are appended to it
        q = torch.tensor([p / 100 for p in NORM_PERCENTILES], device=self.device)
        for net, norms in self._norms.items():
            if norms:
                items.append((_acc(net, "total/before_clip"), "pct", torch.quantile(torch.stack(norms).float(), q)))
        values = torch.cat([t.reshape(-1).float() for _, _, t in items]).cpu().tolist() if items else []
        raw: dict[tuple[str, str], list[float]] = {}
        i = 0
        for key, kind, t in items:
            n = t.numel()
            raw[(key, kind)] = values[i:i + n]
            i += n
        counts = {key: self.stats.count(key) for key, kind, _ in items if kind != "pct"}
        self.stats.reset()
        for norms in self._norms.values():
            norms.clear()

        scalars: dict[str, float] = {"guard/skipped_updates": float(self.skipped_updates),
                                     "guard/nonfinite_actions": float(self.nonfinite_actions)}
        fired: list[str] = []
        for net in self.parts:
            if (_acc(net, BEFORE), "mean") not in raw:
                continue  # this net was not updated in the interval: no metrics rather than zeros
            fired += self._grad_scalars(net, raw, counts, scalars)
        for (key, kind), vals in raw.items():
            if key.startswith(_ACC):  # the nets' accumulators, turned into tags above
                continue
            if key == "train/action_saturation":
                if kind == "mean":
                    for name, v in zip(self.action_names, vals):
                        scalars[f"train/action_saturation/{name}"] = v
                    if max(vals) > self.cfg.saturation_threshold:
                        fired.append(tags.alert_key("actor", "action_saturation"))
                continue
            scalars[key if kind == "mean" else f"{key}_max"] = vals[0]
        if scalars.get("train/q_abs_max", 0.0) > self.q_bound:
            fired.append(tags.alert_key("critic", "q_divergence"))
        if abs(scalars.get("train/actor_loss_max", 0.0)) > self.q_bound or \
                abs(scalars.get("train/actor_loss", 0.0)) > self.q_bound:
            fired.append(tags.alert_key("actor", "q_divergence"))

        for net in self.parts:
            for a in ALERTS:
                if net in a.nets:
                    scalars[tags.alert(net, a.name)] = float(tags.alert_key(net, a.name) in fired)
        for key in fired:
            self.alert_counts[key] = self.alert_counts.get(key, 0) + 1
            net, name = key.split("/")
            log.warning("ALERT %s at step %d: %s", key, step,
                        tags.ALERT_BY_NAME[name].explain(net, scalars, self.thresholds))
        return Flush(scalars, fired)

    def _grad_scalars(self, net: str, raw: dict, counts: dict, scalars: dict[str, float]) -> list[str]:
        names = [*self.parts[net], "total"]
        for when in (BEFORE, AFTER):
            for part, mean, mx in zip(names, raw[(_acc(net, when), "mean")], raw[(_acc(net, when), "max")]):
                scalars[tags.grad_norm(net, part, when)] = mean
                scalars[tags.grad_norm(net, part, when, maximum=True)] = mx
        for pct, v in zip(NORM_PERCENTILES, raw.get((_acc(net, "total/before_clip"), "pct"), [])):
            scalars[tags.norm_percentile(net, pct)] = v
        # the flushed rows are floats: read by ClipRow's and LimitRow's field names
        row = dict(zip(ClipRow._fields, raw[(_acc(net, "coef"), "mean")], strict=True))
        updates = counts[_acc(net, BEFORE)]
        scalars[tags.clip_coef(net)] = row["coef"]
        scalars[tags.clip_fraction(net)] = row["clipped"]
        scalars[tags.updates(net)] = float(updates)
        spikes = round(row["spike"] * updates)
        scalars[tags.spikes(net)] = float(spikes)

        fired = []
        if (_acc(net, "limit"), "mean") in raw:  # clipped in this interval
            mean = dict(zip(LimitRow._fields, raw[(_acc(net, "limit"), "mean")], strict=True))
            top = dict(zip(LimitRow._fields, raw[(_acc(net, "limit"), "max")], strict=True))
            scalars[tags.clip_limit(net)] = mean["limit"]
            scalars[tags.clip_limit(net, maximum=True)] = top["limit"]
            scalars[tags.after_over_limit(net)] = top["ratio"]
            if top["ratio"] > 1 + self.cfg.tolerance:
                fired.append(tags.alert_key(net, "clip_violation"))
        if spikes > self.cfg.spike_alert_rate * updates:
            fired.append(tags.alert_key(net, "grad_spike"))
        if max(raw[(_acc(net, "zero_run"), "max")]) >= self.cfg.dead_steps:
            fired.append(tags.alert_key(net, "dead_gradient"))
        return fired

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"zero_run": {k: v.cpu() for k, v in self._zero_run.items()},
                "spikes": {net: det.state_dict() for net, det in self.spikes.items()},
                "norms": {net: torch.stack(v).cpu() if v else torch.zeros(0) for net, v in self._norms.items()},
                "alert_counts": dict(self.alert_counts), "skipped_updates": self.skipped_updates,
                "nonfinite_actions": self.nonfinite_actions, "stats": self.stats.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d["zero_run"].items():
            self._zero_run[k] = v.to(self.device)
        for net, det in self.spikes.items():
            det.load_state_dict(d["spikes"][net])
        self._norms = {net: list(d["norms"][net].to(self.device).unbind(0)) for net in self.parts}
        self.alert_counts = dict(d["alert_counts"])
        self.skipped_updates = d["skipped_updates"]
        self.nonfinite_actions = d["nonfinite_actions"]
        self.stats.load_state_dict(d["stats"])  # the interval in progress, so the next flush covers all of it
