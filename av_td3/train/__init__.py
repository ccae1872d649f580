"""Training: :func:`run` builds a :class:`Trainer` from the config and runs its loop.

Modules: ``loop`` (the Trainer and its loop), ``build`` (device, seeds, envs, agent, replay buffer),
``episodes`` (per-episode statistics), ``evaluation``, ``resume`` (checkpoint contents), ``signals`` (stop and
preemption), ``summary`` (provenance, hyper-parameters, summary.json's closing figures).
"""

from av_td3.train.build import agent_spec, eval_shares_env, resolve_device, seed_everything
from av_td3.train.loop import Trainer, crossed, run
from av_td3.train.signals import Interrupted, Preempted, preemption_signal
from av_td3.train.summary import flat_hparams, provenance

__all__ = ["Interrupted", "Preempted", "Trainer", "agent_spec", "crossed", "eval_shares_env", "flat_hparams",
           "preemption_signal", "provenance", "resolve_device", "run", "seed_everything"]
