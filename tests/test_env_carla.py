"""CarlaDrivingEnv against the in-repo test double (tests/carla_double.py), against the real client with no server,
and (marked ``carla``) against a real CARLA 0.9.16 server when one is reachable at CARLA_HOST:CARLA_PORT."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs import base
from av_td3.envs.base import INFO_KEYS, REWARD_COMPONENTS, EnvUnavailableError, SimulatorLostError
from av_td3.envs.carla import CarlaDrivingEnv
from tests.carla_double import (LANE_WIDTH, LANES_Y, SPAWN_X, ActorBlueprint, FakeCarlaModule, Image, Location,
                                Transform)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Port-claim files go to the system temp dir: give each test its own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def carla_cfg(**overrides) -> EnvConfig:
    """The env=carla config (conf/env/carla.yaml) with dotted-key overrides, e.g. ``**{"camera.x": 2.0}``."""
    cfg = EnvConfig(name="carla", town="Town01", npcs=4, timeout_s=2.0, max_reconnects=3, max_episode_steps=1000)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def make_env(fake: FakeCarlaModule | None = None, seed: int | None = 0, **overrides):
    fake = fake or FakeCarlaModule()
    sleeps: list[float] = []
    env = CarlaDrivingEnv(carla_cfg(**overrides), seed, carla_module=fake, sleep=sleeps.append)
    return env, fake, sleeps


def calls(fake: FakeCarlaModule, name: str) -> list[tuple]:
    return [c for c in fake.server.calls if c[0] == name]


def image_now(fake: FakeCarlaModule) -> Image:
    """A camera image stamped with the server's current frame."""
    return Image(fake.server.frame, 84, 84)


def ego(fake: FakeCarlaModule):
    (car,) = [a for a in fake.server.of_type("vehicle.") if a.attributes.get("role_name") == "hero"]
    return car


# ------------------------------------------------------------------------------------------------ contract
def test_observation_contract_matches_base():
    env, _, _ = make_env(**{"image.height": 48, "image.width": 64, "image.stack": 3, "lane_points": 4})
    assert env.observation_space == base.observation_space(3, 48, 64, 4)
    assert env.action_space == base.action_space()
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert set(INFO_KEYS) <= set(info) and info["reconnects"] == 0
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.5], dtype=np.float32))
    assert env.observation_space.contains(obs)
    assert set(INFO_KEYS) <= set(info) and set(info["reward_components"]) == set(REWARD_COMPONENTS)
    assert isinstance(reward, float) and not terminated and not truncated
    env.close()


def test_import_without_carla_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)  # makes `import carla` raise ImportError
    with pytest.raises(EnvUnavailableError, match=r"pip install '\.\[carla\]'"):
        CarlaDrivingEnv(carla_cfg(), 0)


def test_action_mapping_and_non_finite_actions_never_reach_the_simulator():
    env, fake, _ = make_env()
    env.reset(seed=0)
    env.step(np.array([0.5, 0.7]))
    # steer is negated: our steer > 0 turns left, CARLA's turns right
    assert calls(fake, "apply_control")[-1] == ("apply_control", pytest.approx(0.7), pytest.approx(-0.5), 0.0)
    env.step(np.array([-0.25, -0.4]))
    assert calls(fake, "apply_control")[-1] == ("apply_control", 0.0, pytest.approx(0.25), pytest.approx(0.4))
    n = len(calls(fake, "apply_control"))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.nan, 0.0]))
    assert len(calls(fake, "apply_control")) == n
    env.close()


def test_left_handed_world_is_converted_to_the_ego_frame():
    """CARLA's y points right: a car 1 m to CARLA's -y of the lane centre is 1 m LEFT of it; a car yawed +10° in
    CARLA (towards +y, to the right) has a heading error of -10° and sees the lane ahead on its left."""
    env, fake, _ = make_env(**{"route.start_index": 0, "lane_points": 3, "lane_point_spacing": 4.0})
    env.reset(seed=0)
    car = ego(fake)
    car.transform.location.y = LANES_Y[0] - 1.0
    _, state, signals = env._observe(image_now(fake))
    assert signals.lateral_offset == pytest.approx(1.0) and state[1] == pytest.approx(1.0)
    np.testing.assert_allclose(state[base.lane_point_slice(3)].reshape(3, 2), [[4, -1], [8, -1], [12, -1]], atol=1e-5)

    car.transform.location.y, car.transform.rotation.yaw, car.speed = LANES_Y[0], 10.0, 5.0
    _, state, signals = env._observe(image_now(fake))
    assert signals.heading_error == pytest.approx(-math.radians(10.0)) and state[2] == signals.heading_error
    assert signals.speed == pytest.approx(5.0)
    assert signals.speed_along_lane == pytest.approx(5.0 * math.cos(math.radians(10.0)))
    assert np.all(state[base.lane_point_slice(3)].reshape(3, 2)[:, 1] > 0)  # the lane ahead is to the car's left
    env.close()


def test_state_holds_the_lead_npc_in_the_route_lane():
    """The nearest of our NPCs ahead in the route's lane sets the lead gap and closing speed; one in the next lane
    or behind does not, nor one beyond LEAD_RANGE_M."""
    env, fake, _ = make_env(npcs=3, **{"route.start_index": 0})
    env.reset(seed=0)
    car = ego(fake)
    car.speed = 8.0
    x0, y0 = car.transform.location.x, car.transform.location.y
    npcs = [a for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None]
    for npc, (dx, y, speed) in zip(npcs, [(15.0, y0 + 0.5, 3.0), (6.0, y0 + LANE_WIDTH, 0.0), (-6.0, y0, 0.0)]):
        npc.transform.location.x, npc.transform.location.y, npc.transform.rotation.yaw = x0 + dx, y, 0.0
        npc.speed = speed
    _, state, _ = env._observe(image_now(fake))
    assert state[base.LEAD_GAP] == pytest.approx(15.0, abs=1e-4)
    assert state[base.LEAD_CLOSING] == pytest.approx(8.0 - 3.0, abs=1e-4)

    env.cfg.lead_vehicle = False  # the ablation: the same scene reads "nobody ahead"
    _, state, _ = env._observe(image_now(fake))
    assert (state[base.LEAD_GAP], state[base.LEAD_CLOSING]) == (base.LEAD_RANGE_M, 0.0)
    env.cfg.lead_vehicle = True

    npcs[0].transform.location.x = x0 + base.LEAD_RANGE_M + 5.0  # out of range: nobody ahead
    _, state, _ = env._observe(image_now(fake))
    assert (state[base.LEAD_GAP], state[base.LEAD_CLOSING]) == (base.LEAD_RANGE_M, 0.0)
    env.close()


def test_collision_terminates_lane_invasion_is_flagged_off_road_terminates():
    env, fake, _ = make_env(**{"route.start_index": 0})
    env.reset(seed=0)
    fake.server.collide_at = {fake.server.frame + 1}
    _, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert info["collision"] and terminated and not truncated
    assert info["reward_components"]["safety"] <= -env.cfg.reward.collision_penalty

    env.reset(seed=0)
    ego(fake).transform.location.y = LANES_Y[0] + LANE_WIDTH / 2 - 0.01  # on the marking: the next move crosses it
    ego(fake).transform.rotation.yaw = 80.0
    ego(fake).speed = 5.0
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert info["lane_invasion"] and not info["off_road"] and not terminated

    env.reset(seed=0)
    ego(fake).transform.location.y = LANES_Y[0] - LANE_WIDTH  # beyond the left edge of the road
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert info["off_road"] and terminated
    env.close()


# ----------------------------------------------------------------------------------------- frame matching
def test_stale_camera_image_is_skipped_and_the_ticks_frame_is_used():
    env, fake, _ = make_env(**{"image.stack": 2})
    env.reset(seed=0)
    fake.server.stale_images = True  # every tick now first delivers an image of the previous frame
    env._images.put(image_now(fake))  # and one left over from an earlier tick is already waiting
    obs, *_ = env.step(np.zeros(2))
    assert np.all(obs["image"][-1] == fake.server.frame % 256)
    obs, *_ = env.step(np.zeros(2))
    assert np.all(obs["image"][-1] == fake.server.frame % 256)
    assert np.all(obs["image"][0] == (fake.server.frame - 1) % 256)
    env.close()


def test_missing_camera_image_is_a_time_out_not_a_hang():
    env, fake, _ = make_env(timeout_s=0.2)
    env.reset(seed=0)
    (camera,) = fake.server.of_type("sensor.camera")
    camera.callback = None  # the server stops delivering images
    start = time.monotonic()
    obs, _, terminated, truncated, info = env.step(np.zeros(2))
    assert time.monotonic() - start < 2.0
    assert truncated and not terminated and info["reconnects"] == 1  # handled like any time-out
    env.close()


# --------------------------------------------------------------------------------------- lifecycle, cleanup
def test_close_stops_sensors_then_destroys_all_actors_in_one_batch_then_restores_settings():
    fake = FakeCarlaModule()
    fake.server.settings.fixed_delta_seconds = 0.0  # the server's own settings before we touch it
    env, _, _ = make_env(fake, npcs=5)
    env.reset(seed=0)
    sensor_ids = [a.id for a in fake.server.of_type("sensor.")]
    vehicle_ids = [a.id for a in fake.server.of_type("vehicle.")]
    assert len(vehicle_ids) == 6 and len(sensor_ids) == 3
    start = len(fake.server.calls)
    env.close()
    tail = fake.server.calls[start:]
    assert [c[0] for c in tail] == ["stop", "stop", "stop", "apply_batch_sync", "apply_settings",
                                    "tm.set_synchronous_mode"]
    assert sorted(c[1] for c in tail[:3]) == sorted(sensor_ids)
    assert tail[3][1] == ["DestroyActor"] * 9
    assert tail[4] == ("apply_settings", False, 0.0) and tail[5] == ("tm.set_synchronous_mode", False)
    assert fake.server.actors == {}
    assert not list(os.scandir(tempfile.gettempdir()))  # port claims released
    env.close()  # a second close is harmless
    assert fake.server.calls[start + len(tail):] == []


def test_reset_moves_the_ego_and_does_not_respawn_anything():
    env, fake, _ = make_env(npcs=6)
    env.reset(seed=0)
    actors = dict(fake.server.actors)
    spawns = len(calls(fake, "spawn_actor")) + len(calls(fake, "apply_batch_sync"))
    for seed in (1, 2, 3):
        env.reset(seed=seed)
    assert fake.server.actors == actors
    assert len(calls(fake, "spawn_actor")) + len(calls(fake, "apply_batch_sync")) == spawns
    assert len(calls(fake, "set_transform")) == 4  # one teleport per reset
    env.close()


def test_random_start_is_seeded_and_avoids_npcs():
    env, fake, _ = make_env(npcs=5)
    npcs = [a.transform.location for a in fake.server.of_type("vehicle.") if a.autopilot_port]
    starts = []
    for _ in range(2):
        env.reset(seed=7)
        starts.append((ego(fake).transform.location.x, ego(fake).transform.location.y))
        assert all(n.distance(ego(fake).transform.location) > 10.0 for n in npcs)
    assert starts[0] == starts[1]
    env.close()


def test_leftovers_of_a_killed_run_are_avoided_and_reported(caplog):
    fake = FakeCarlaModule()
    fake.server.settings.synchronous_mode = True  # left so by a run that never closed
    leftovers = [fake.server.spawn(ActorBlueprint("vehicle.audi.a2"), Transform(Location(x, y)))
                 for x in SPAWN_X[:-1] for y in LANES_Y]  # only the last column of spawn points is free
    with caplog.at_level(logging.WARNING):
        env, _, _ = make_env(fake, npcs=0)
    assert "already in synchronous mode" in caplog.text
    for seed in range(3):
        env.reset(seed=seed)
        assert all(car.transform.location.distance(ego(fake).transform.location) > 10.0 for car in leftovers)
    env.close()
    assert set(fake.server.actors) == {car.id for car in leftovers}  # only what we spawned is destroyed


def test_world_is_loaded_only_when_the_town_changes():
    env, fake, _ = make_env(town="Town01")
    env.close()
    assert calls(fake, "load_world") == []
    env, fake, _ = make_env(FakeCarlaModule(town="Town01"), town="Town02")
    assert [c[1] for c in calls(fake, "load_world")] == ["Town02"]
    assert calls(fake, "load_world")[0][2] >= 60.0  # loading gets a long time-out ...
    assert calls(fake, "set_timeout")[-1] == ("set_timeout", 2.0)  # ... and timeout_s is back afterwards
    env.close()
    with pytest.raises(ConfigError, match=r"env.town='Atlantis'.*Town01, Town02, Town10HD_Opt"):
        make_env(town="Atlantis")


# --------------------------------------------------------------------------------- reconnect and truncation
def test_time_out_mid_episode_reconnects_and_truncates_on_the_last_good_observation():
    env, fake, sleeps = make_env()
    env.reset(seed=0)
    good, *_ = env.step(np.array([0.0, 1.0]))
    old_actors = set(fake.server.actors)
    fake.server.timeouts_on_tick = 1
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0]))
    assert truncated and not terminated and reward == 0.0
    assert info["reconnects"] == 1 and sleeps == [1.0]
    np.testing.assert_array_equal(obs["image"], good["image"])
    np.testing.assert_array_equal(obs["state"], good["state"])
    assert len(fake.server.clients) == 2
    # the old actors were removed and the scene rebuilt once: no leak
    assert not old_actors & set(fake.server.actors) and len(fake.server.actors) == 1 + 4 + 3
    obs, info = env.reset(seed=1)
    assert info["reconnects"] == 1
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert not terminated and not truncated and info["reconnects"] == 1
    env.close()


def test_losing_the_server_for_good_raises_simulator_lost_after_max_reconnects():
    env, fake, sleeps = make_env(max_reconnects=3)
    env.reset(seed=0)
    fake.server.down = True
    with pytest.raises(SimulatorLostError, match=r"localhost:2000.*rerun the same command"):
        env.step(np.zeros(2))
    assert sleeps == [1.0, 2.0, 4.0]  # exponential back-off
    assert len(fake.server.clients) == 1 + 3
    env.close()  # does not raise with the server gone


def test_max_reconnects_zero_gives_up_at_once():
    env, fake, sleeps = make_env(max_reconnects=0)
    env.reset(seed=0)
    fake.server.timeouts_on_tick = 1
    with pytest.raises(SimulatorLostError):
        env.step(np.zeros(2))
    assert sleeps == []
    env.close()


def test_time_out_during_reset_is_retried():
    env, fake, sleeps = make_env()
    fake.server.timeouts_on_tick = 2  # the reset's tick, then the rebuild's tick after the first reconnect
    obs, info = env.reset(seed=0)
    assert info["reconnects"] == 1 and sleeps == [1.0, 2.0]
    assert env.observation_space.contains(obs)
    env.close()


def test_unreachable_server_at_start_is_env_unavailable():
    fake = FakeCarlaModule()
    fake.server.down = True
    with pytest.raises(EnvUnavailableError, match=r"somehost:2345.*docker compose -f docker/compose.yaml up"):
        make_env(fake, host="somehost", port=2345)
    assert not list(os.scandir(tempfile.gettempdir()))


# ------------------------------------------------------------------------------ every config key takes effect
def test_connection_keys_reach_the_client():
    env, fake, _ = make_env(host="carla-box", port=2010, tm_port=8010, timeout_s=3.5, npcs=2)
    assert calls(fake, "Client")[0] == ("Client", "carla-box", 2010)
    assert ("set_timeout", 3.5) in fake.server.calls
    assert calls(fake, "get_trafficmanager") == [("get_trafficmanager", 8010)]
    npcs = [a for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None]
    assert [a.autopilot_port for a in npcs] == [8010, 8010]
    env.reset(seed=0)
    env.step(np.zeros(2))
    assert calls(fake, "tick")[-1] == ("tick", 3.5)  # world.tick waits timeout_s
    env.close()


def test_simulation_keys_reach_the_world():
    env, fake, _ = make_env(fixed_delta_s=0.02, weather="HardRainNoon", npcs=7)
    assert ("apply_settings", True, 0.02) in fake.server.calls
    assert fake.server.tm.synchronous and fake.server.tm.seed == 0
    assert fake.server.weather.name == "HardRainNoon"
    assert env.reward_fn.dt == 0.02
    assert len([a for a in fake.server.of_type("vehicle.") if a.autopilot_port]) == 7
    # one batch spawns the NPCs, each with autopilot
    assert calls(fake, "apply_batch_sync")[0][1] == ["SpawnActor"] * 7
    ticks = len(calls(fake, "tick"))
    env.reset(seed=5)
    assert len(calls(fake, "tick")) - ticks == math.ceil(0.5 / 0.02)  # settling takes SETTLE_S at this delta
    assert fake.server.tm.seed == 5  # reset(seed) reseeds the Traffic Manager
    env.close()
    with pytest.raises(ConfigError, match="env.weather='Sunny'.*ClearNoon"):
        make_env(weather="Sunny")


def test_image_and_camera_keys():
    env, fake, _ = make_env(**{"image.height": 32, "image.width": 40, "image.stack": 5, "camera.width": 160,
                               "camera.height": 120, "camera.fov": 70.0, "camera.x": 0.8, "camera.y": 0.4,
                               "camera.z": 1.7, "camera.pitch": -8.0})
    (camera,) = fake.server.of_type("sensor.camera.rgb")
    assert camera.attributes["image_size_x"] == "160" and camera.attributes["image_size_y"] == "120"
    assert float(camera.attributes["fov"]) == 70.0
    loc, rot = camera.transform.location, camera.transform.rotation
    assert (loc.x, loc.y, loc.z, rot.pitch) == (0.8, -0.4, 1.7, -8.0)  # y left in our config, right in CARLA
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (5, 32, 40) and obs["image"].dtype == np.uint8
    assert np.all(obs["image"] == fake.server.frame % 256)  # resized from 160x120, values kept
    env.close()


def test_route_keys():
    env, fake, _ = make_env(**{"route.start_index": 13, "route.length_m": 50.0, "route.spacing_m": 5.0,
                               "lane_points": 2, "lane_point_spacing": 3.0})
    env.reset(seed=0)
    # the ego sits on spawn point 13
    assert (ego(fake).transform.location.x, ego(fake).transform.location.y) == (SPAWN_X[3], LANES_Y[1])
    np.testing.assert_allclose(np.diff(env._route.s), 5.0)
    assert env._route.s[-1] >= 50.0 + 2 * 3.0
    # driving along the lane ends the episode as truncated (not terminal) once 50 m are done
    ego(fake).speed = 10.0
    for _ in range(200):
        _, _, terminated, truncated, info = env.step(np.array([0.0, 0.0]))
        if truncated or terminated:
            break
    assert truncated and not terminated
    assert 50.0 <= env._prev_s < 52.0
    env.close()
    with pytest.raises(ConfigError, match="env.route.start_index=99 but Town01 has 30 spawn points"):
        make_env(**{"route.start_index": 99})


def test_max_episode_steps_truncates():
    env, _, _ = make_env(max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(2))[3] for _ in range(3)]
    assert flags == [False, False, True]
    env.close()


def test_reward_weights_take_effect():
    rewards = {}
    for weight in (0.1, 1.0):
        env, fake, _ = make_env(**{"reward.progress": weight, "route.start_index": 0})
        env.reset(seed=0)
        ego(fake).speed = 10.0
        _, reward, _, _, info = env.step(np.zeros(2))
        rewards[weight] = info["reward_components"]["progress"]
        assert env.reward_fn.cfg is env.cfg.reward  # every reward.* key: the shared RewardFunction reads them
        env.close()
    assert rewards[1.0] == pytest.approx(10 * rewards[0.1]) and rewards[1.0] > 0


def test_ignored_embedded_keys_warn(caplog):
    with caplog.at_level(logging.WARNING):
        env, _, _ = make_env(policy_frequency=10)
    assert "env.policy_frequency is ignored by env=carla" in caplog.text
    env.close()


# ------------------------------------------------------------------------------------------- shared servers
def test_warns_when_another_live_process_uses_the_same_server(caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = os.path.join(tempfile.gettempdir(), "av_td3_carla_localhost_2000.lock")
        with open(path, "w") as f:
            f.write(str(holder.pid))
        with caplog.at_level(logging.WARNING):
            env, _, _ = make_env()
        assert f"CARLA server localhost:2000 is already in use by av-td3 process {holder.pid}" in caplog.text
        env.close()
    finally:
        holder.kill()
        holder.wait()
    caplog.clear()
    with open(path, "w") as f:  # the holder is dead now: a stale claim is taken over silently
        f.write(str(holder.pid))
    with caplog.at_level(logging.WARNING):
        env, _, _ = make_env()
        assert open(path).read() == str(os.getpid())
        env.close()
    assert "already in use" not in caplog.text and not os.path.exists(path)


def test_two_servers_sharing_a_traffic_manager_port_warn(caplog):
    first, _, _ = make_env()
    with caplog.at_level(logging.WARNING):
        second, _, _ = make_env(port=2004, tm_port=8000)
    assert "Traffic Manager port 8000 is already in use" in caplog.text
    assert "localhost:2004 is already in use" not in caplog.text
    first.close()
    second.close()


# ------------------------------------------------------------------------------------- the real CARLA client
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_client_no_server_is_env_unavailable_within_timeout():
    pytest.importorskip("carla")
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(EnvUnavailableError) as caught:
        CarlaDrivingEnv(carla_cfg(host="127.0.0.1", port=port, timeout_s=2.0), 0)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0 + 3.0, elapsed
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "docker compose -f docker/compose.yaml up -d carla" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one message, no chained wall


def _server_address() -> tuple[str, int]:
    return os.environ.get("CARLA_HOST", "localhost"), int(os.environ.get("CARLA_PORT", "2000"))


def _server_reachable() -> bool:
    try:
        with socket.create_connection(_server_address(), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.mark.carla
@pytest.mark.skipif(not _server_reachable(), reason="no CARLA server at CARLA_HOST:CARLA_PORT (default localhost:2000)")
def test_real_server_runs_a_few_steps():
    host, port = _server_address()
    cfg = carla_cfg(host=host, port=port, timeout_s=30.0, npcs=5)
    env = CarlaDrivingEnv(cfg, 0)
    try:
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        for _ in range(10):
            obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.5], dtype=np.float32))
            assert env.observation_space.contains(obs) and math.isfinite(reward)
            if terminated or truncated:
                break
        assert info["speed"] >= 0.0 and info["reconnects"] == 0
    finally:
        env.close()


def test_positive_steer_turns_left_as_in_the_embedded_env():
    """The contract's steer > 0 turns left; CARLA's VehicleControl.steer > 0 turns right, so it is negated."""
    env, fake, _ = make_env(**{"route.start_index": 0})
    env.reset(seed=0)
    for _ in range(15):
        _, _, _, _, info = env.step(np.array([0.6, 0.6], np.float32))
    sent = calls(fake, "apply_control")[-1]
    assert sent[2] == pytest.approx(-0.6)
    _, state, signals = env._observe(image_now(fake))
    assert signals.lateral_offset > 0 and signals.heading_error > 0  # drifted and turned to the left
    env.close()
