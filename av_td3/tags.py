"""The gradient monitor's vocabulary, declared once: the TensorBoard tags it logs under, the percentiles it
takes, and its alerts (name, which nets, where the threshold comes from, severity, the sentence that explains a
firing). The monitor (:mod:`av_td3.agent.monitor`) writes these names; ``summary.json``'s reading of them
(:mod:`av_td3.rundir`), ``validate``, ``compare`` and the plots read them from here.

The tag schema (docs/outputs-and-tags.md):

* ``grad/<net>/<part>/{before_clip,after_clip}[_max]``: mean [max] over a logging interval of a part's global L2
  norm (part: cnn, mlp, total), before and after the net's clip;
* ``grad/<net>/total/before_clip_p<q>``: the interval's percentiles (:data:`NORM_PERCENTILES`) of the total norm;
* ``grad/<net>/{clip_coef,clip_fraction,updates,spikes,clip_limit,clip_limit_max,after_over_limit_max}``;
* ``alert/<net>/<name>``: 0 or 1 per flush, one per alert of :data:`ALERTS` that applies to the net.

Plain Python on purpose: the analysis imports this module without pulling in torch, and it imports nothing of
the package (imports point one way: the training path and the analysis both read it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

NETS = ("actor", "critic")
NORM_PERCENTILES = (50, 90, 99)  # of each interval's before-clip total norms
BEFORE, AFTER = "before", "after"  # the two measurements of one update: before and after the clip


# ------------------------------------------------------------------------------------------------------ grad/*
def grad_norm(net: str, part: str, when: str, maximum: bool = False) -> str:
    """``grad/<net>/<part>/{before,after}_clip[_max]``: the interval's mean (or max) norm of a part."""
    return f"grad/{net}/{part}/{when}_clip" + ("_max" if maximum else "")


def grad_norm_pattern(net: str, when: str) -> str:
    """A regular expression matching every part's ``grad_norm(net, part, when)``, mean and max."""
    return rf"grad/{net}/[^/]+/{when}_clip(?:_max)?"


def norm_percentile(net: str, q: int) -> str:
    """``grad/<net>/total/before_clip_p<q>``: the ``q``-th percentile of the interval's before-clip norms."""
    return f"{grad_norm(net, 'total', BEFORE)}_p{q}"


def clip_coef(net: str) -> str:
    return f"grad/{net}/clip_coef"          # mean after / before total norm


def clip_fraction(net: str) -> str:
    return f"grad/{net}/clip_fraction"      # share of updates clipped (under agc: of units)


def updates(net: str) -> str:
    return f"grad/{net}/updates"            # updates of the net in the interval


def spikes(net: str) -> str:
    return f"grad/{net}/spikes"             # of them, gradient spikes


def clip_limit(net: str, maximum: bool = False) -> str:
    return f"grad/{net}/clip_limit" + ("_max" if maximum else "")  # the limit used: mean [max]


def after_over_limit(net: str) -> str:
    return f"grad/{net}/after_over_limit_max"  # the largest after-clip norm / limit used: the invariant is <= 1


# ----------------------------------------------------------------------------------------------------- alert/*
ALERT_PREFIX = "alert/"
# Severities: numerical failure (a run with it is diverged), the monitor's own invariant broken (a broken clip,
# not a bad run), and the rest (worth a look; no verdict of their own).
DIVERGENCE, INVARIANT, WARNING = "divergence", "invariant", "warning"


def alert_key(net: str, name: str) -> str:
    """``<net>/<name>``: an alert as ``Flush.fired`` and ``summary.json``'s ``alerts`` name it."""
    return f"{net}/{name}"


def alert(net: str, name: str) -> str:
    """``alert/<net>/<name>``: the alert's tag, 0 or 1 per flush."""
    return ALERT_PREFIX + alert_key(net, name)


class Thresholds(NamedTuple):
    """The numbers the alerts' explanations quote, from the run's configuration."""
    per_unit: bool               # agent.clip.mode=agc: the invariant holds per unit
    spike_z: float               # monitor.spike_z
    q_bound: float               # margin x max|r| / (1 - gamma) (av_td3.bounds.q_bound)
    dead_steps: int              # monitor.dead_steps
    saturation_threshold: float  # monitor.saturation_threshold


@dataclass(frozen=True)
class Alert:
    name: str
    nets: tuple[str, ...]  # the nets it is logged for
    threshold: str         # what it is judged against (configuration keys)
    severity: str          # DIVERGENCE, INVARIANT or WARNING
    explain: Callable[[str, Mapping[str, float], Thresholds], str]  # (net, the flush's scalars, thresholds) -> why


def _clip_violation(net: str, s: Mapping[str, float], t: Thresholds) -> str:
    which = "a unit's after-clip norm" if t.per_unit else "after-clip norm"
    return f"{which} {s[after_over_limit(net)]:.4g} x the limit used (> 1 + monitor.tolerance): the clip did not hold"


def _grad_spike(net: str, s: Mapping[str, float], t: Thresholds) -> str:
    return (f"{s[spikes(net)]:.0f} of {s[updates(net)]:.0f} updates' before-clip norms more than {t.spike_z:g} std "
            f"above their running log-mean (max {s[grad_norm(net, 'total', BEFORE, maximum=True)]:.4g})")


# The alerts, in the order each net's alert/* tags are logged.
ALERTS: tuple[Alert, ...] = (
    Alert("clip_violation", NETS, "1 + monitor.tolerance x the limit used", INVARIANT, _clip_violation),
    Alert("grad_spike", NETS, "monitor.spike_alert_rate of the interval's updates (spikes: monitor.spike_z)",
          WARNING, _grad_spike),
    Alert("q_divergence", NETS, "|Q| or |actor loss| beyond monitor.q_margin x max|r| / (1 - gamma)", DIVERGENCE,
          lambda net, s, t: f"|Q| or |actor loss| beyond {t.q_bound:.4g} = margin x max|r| / (1 - gamma)"),
    Alert("dead_gradient", NETS, "monitor.dead_steps consecutive updates with a part's gradient 0", WARNING,
          lambda net, s, t: f"a part of the {net} had zero gradient for {t.dead_steps}+ consecutive updates"),
    Alert("action_saturation", ("actor",), "monitor.saturation_threshold of actions beyond "
          "monitor.saturation_level", WARNING,
          lambda net, s, t: f"actions pinned at the bounds more than {t.saturation_threshold:.0%} of the time"),
)
ALERT_BY_NAME: dict[str, Alert] = {a.name: a for a in ALERTS}


def alerts_of(severity: str) -> tuple[str, ...]:
    """The names of the alerts of one severity."""
    return tuple(a.name for a in ALERTS if a.severity == severity)
