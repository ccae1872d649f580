"""Stopping on a signal: the loop stops between steps, where the state is consistent, and checkpoints.

SIGINT and SIGTERM stop a run (:class:`Interrupted`). In a submitit job (``launcher=slurm``) the launcher's own
handler for the preemption signal requeues the job at once; the trainer takes that signal first, checkpoints,
then hands it on (:class:`Preempted`), so the requeued job resumes from where this one stopped instead of from
the last periodic checkpoint.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable


class Interrupted(RuntimeError):
    def __init__(self, signum: int, what: str = "interrupted by") -> None:
        super().__init__(f"{what} {signal.Signals(signum).name}")
        self.signum = signum


class Preempted(Interrupted):
    """A cluster launcher announced preemption or the end of the job's time slot. The trainer checkpoints; then
    ``requeue(signum, None)``, the launcher's own handler (submitit's), requeues the job, which resumes."""

    def __init__(self, signum: int, requeue: Callable[[int, Any], Any]) -> None:
        super().__init__(signum, "preempted: the cluster launcher sent")
        self.requeue = requeue


def preemption_signal() -> signal.Signals:
    """The signal submitit jobs receive before preemption or their time limit: USR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` names another."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class StopSignals:
    """Records the stop signals that arrive between :meth:`install` and :meth:`restore`; :meth:`check` raises
    for the first one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._launcher_handler: Any = None
        self._old_handlers: dict[int, Any] = {}

    def install(self) -> None:
        stop = [signal.SIGINT, signal.SIGTERM]
        self._launcher_handler = signal.getsignal(preemption_signal())
        if callable(self._launcher_handler):  # only taken when a launcher handles it
            stop.append(preemption_signal())
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in stop}

    def restore(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received = signum  # acted on by check(), between steps

    def check(self) -> None:
        """Raise :class:`Preempted` or :class:`Interrupted` if a stop signal arrived."""
        if self.received is None:
            return
        if self.received == preemption_signal():
            raise Preempted(self.received, self._launcher_handler)
        raise Interrupted(self.received)
