"""scripts/carla_acceptance.py, the acceptance run for a real CARLA server, run against the test double so that it
cannot rot (#35 item 11). It runs in a subprocess: it sends itself SIGTERM and SIGUSR2 and swaps in the double."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "carla_acceptance.py"
CHECKS = ("first_frame", "same_seed", "lights", "steps_per_s", "close", "restart_then_sigterm", "sigusr2")


@pytest.mark.slow
def test_the_acceptance_script_passes_against_the_double(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--double", "--out", str(report)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in report.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| check", "| ---"))}
    assert rows == {name: ("measured" if name == "steps_per_s" else "pass") for name in CHECKS}
    text = report.read_text()
    assert "1 interrupted step(s) not stored, training went on" in text and "0 vehicles and sensors" in text
    assert "ended red_light" in text  # the double's light is red at its junction


def test_a_server_left_synchronous_or_with_actors_fails_the_check() -> None:
    spec = importlib.util.spec_from_file_location("carla_acceptance", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    class Server:
        def __init__(self, state: tuple[bool, int]) -> None:
            self.state = state

        def server_state(self, timeout_s: float) -> tuple[bool, int]:
            return self.state

    cfg = script.compose("env=carla")
    assert script.server_given_back(Server((False, 0)), cfg, "after close()")[0] is True
    assert script.server_given_back(Server((True, 0)), cfg, "after close()")[0] is False
    assert script.server_given_back(Server((False, 3)), cfg, "after close()")[1] == (
        "after close(): asynchronous, 3 vehicles and sensors")
