"""docker/compose.yaml read as data (no Docker engine needed): what it publishes, and where; restart, health check
and GPU reservations."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker" / "compose.yaml"
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}`` substitution (enough for this file)."""
    return VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def services(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env or {}))["services"]


def published(service: dict) -> list[tuple[str, str]]:
    """(host address, host port range) of each published port, short or long syntax; no address = every one."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), str(port.get("published", ""))))
            continue
        parts = str(port).rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0].strip("[]"), parts[1]))
        else:  # "6006:6006" or "6006": Docker binds every interface
            out.append(("0.0.0.0", parts[0]))
    return out


def test_every_published_port_is_on_loopback_by_default():
    ports = {name: published(service) for name, service in services().items()}
    assert ports["carla"] == [("127.0.0.1", "2000-2002")] and ports["tensorboard"] == [("127.0.0.1", "6006")]
    for name, entries in ports.items():
        for address, _ in entries:
            assert ipaddress.ip_address(address).is_loopback, f"{name} publishes on {address}"


def test_the_addresses_are_the_users_to_set():
    ports = {name: published(s) for name, s in services({"CARLA_BIND_ADDRESS": "0.0.0.0",
                                                         "TENSORBOARD_BIND_ADDRESS": "10.0.0.5"}).items()}
    assert ports["carla"] == [("0.0.0.0", "2000-2002")] and ports["tensorboard"] == [("10.0.0.5", "6006")]
    header = COMPOSE.read_text().split("\nx-gpu")[0]
    assert "CARLA_BIND_ADDRESS" in header and "TENSORBOARD_BIND_ADDRESS" in header  # documented where they are used


def test_the_server_restarts_and_the_trainer_waits_for_its_health_check():
    s = services()
    assert s["carla"]["restart"] == "unless-stopped"
    assert "test" in s["carla"]["healthcheck"]
    for trainer in ("train", "train-cuda"):
        assert s[trainer]["depends_on"]["carla"]["condition"] == "service_healthy"


def gpus(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("name, torch, gpu", [("train", "cpu", False), ("train-cuda", "cuda", True),
                                              ("tensorboard", "cpu", False), ("carla", None, True)])
def test_only_the_server_and_the_cuda_trainer_reserve_a_gpu(name, torch, gpu):
    service = services()[name]
    assert bool(gpus(service)) is gpu
    if torch is not None:
        assert service["build"]["args"]["TORCH"] == torch
    if name == "train-cuda":
        assert service["profiles"] == ["cuda"]  # not started by a plain `up`


def seconds(duration: str) -> float:
    """Compose's duration ("1m30s", "90s", "3m") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


# A full default checkpoint at env=carla's frame size (715 MB, incompressible frames) took 21-23 s to write on a
# loaded 2-core VM (#35 item 8, the comment in compose.yaml); a stop may first wait for a periodic write in flight.
CHECKPOINT_WRITE_S = 23.0


@pytest.mark.parametrize("name", ["train", "train-cuda"])
def test_the_trainers_have_time_to_checkpoint_when_stopped(name):
    """#35 item 8: Docker's default 10 s before SIGKILL cut the stop checkpoint short."""
    grace = seconds(services()[name].get("stop_grace_period", "10s"))
    assert grace >= 2 * CHECKPOINT_WRITE_S * 2, f"{name}: stop_grace_period {grace:g} s"
    assert "stop_grace_period" in COMPOSE.read_text().split("\nservices:")[0]  # with the measurement beside it


def documented_docker_runs() -> list[tuple[str, str]]:
    """(file, command) of every `docker run` in the Markdown docs, continuation lines joined."""
    root = COMPOSE.parents[1]
    runs = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "docker").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")
        runs += [(page.name, line) for line in text.splitlines() if "docker run" in line]
    return runs


def test_every_documented_docker_run_publishes_on_loopback_only():
    """#35 item 8: the docs' second server was published on every interface (-p 2004-2006:2004-2006)."""
    runs = documented_docker_runs()
    assert runs, "no documented docker run found: this test would check nothing"
    for page, command in runs:
        for flag, value in re.findall(r"(-p|--publish)[ =](\S+)", command):
            assert re.match(r"(127\.0\.0\.1|\[::1\]):", value), f"{page}: {flag} {value} is not on loopback"
        assert not re.search(r"\s(-P|--publish-all)(\s|$)", command), f"{page}: -P publishes on every interface"
