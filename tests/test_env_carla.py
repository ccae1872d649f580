"""The CARLA backend against the in-repo test double (tests/carla_double.py), against the real client with no
server, and (marked ``carla``) against a real CARLA 0.9.16 server when one is reachable at CARLA_HOST:CARLA_PORT.
``CarlaSession`` is the env on one server in one process; ``CarlaDrivingEnv`` (what the trainer uses) runs a
session in a worker process and restarts it when the server is lost."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from av_td3.config import CarlaConfig, ConfigError, EnvConfig
from av_td3.envs import backends, base
from av_td3.envs.base import (INFO_KEYS, REWARD_COMPONENTS, EnvUnavailableError, SimulatorLostError,
                              SimulatorUnusableError)
from av_td3.envs.carla import CarlaDrivingEnv, CarlaSession
from av_td3.envs.carla import lights
from av_td3.envs.carla import worker as carla_worker
from av_td3.envs.carla.ports import claim_dir, claim_path, server_key
from tests import carla_double
from tests.carla_double import (LANE_WIDTH, LANES_Y, SPAWN_X, ActorBlueprint, FakeCarlaModule, Image, Location,
                                Transform)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Port-claim files go to the system temp dir: give each test its own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


CARLA_KEYS = {f.name for f in dataclasses.fields(CarlaConfig)}


def carla_cfg(**overrides) -> EnvConfig:
    """The env=carla config (conf/env/carla.yaml) with dotted-key overrides of ``env.*``, e.g.
    ``**{"image.height": 32}``; the backend's own ``env.carla.*`` keys are given without ``carla.``, e.g.
    ``timeout_s=2.0`` or ``**{"camera.x": 2.0}``."""
    cfg = EnvConfig(name="carla", town="Town01", npcs=4, max_episode_steps=1000,
                    carla=CarlaConfig(timeout_s=2.0, max_reconnects=3, event_wait_s=0.0))
    for key, value in overrides.items():
        if key.split(".")[0] in CARLA_KEYS:
            key = f"carla.{key}"
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def make_env(fake: FakeCarlaModule | None = None, seed: int | None = 0, **overrides):
    fake = fake or FakeCarlaModule()
    sleeps: list[float] = []
    env = CarlaSession(carla_cfg(**overrides), seed, carla_module=fake, sleep=sleeps.append)
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
    declared = backends.CARLA
    # The base layout plus the backend's state tail (the traffic light), as its declaration says.
    assert env.observation_space == base.observation_space(3, 48, 64, 4, tail=2)
    assert env.observation_space["state"].shape == (declared.state_dim(env.cfg),) == (5 + 2 * 4 + 2,)
    assert env.action_space == base.action_space()
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert set(INFO_KEYS) <= set(info) and info["reconnects"] == 0
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.5], dtype=np.float32))
    assert env.observation_space.contains(obs)
    assert set(INFO_KEYS) <= set(info) and tuple(info["reward_components"]) == declared.reward_components
    assert set(REWARD_COMPONENTS) < set(declared.reward_components)
    assert isinstance(reward, float) and not terminated and not truncated and info["interrupted"] is False
    env.close()


def test_import_without_carla_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)  # makes `import carla` raise ImportError
    with pytest.raises(EnvUnavailableError, match=r"pip install '\.\[carla\]'"):
        CarlaSession(carla_cfg(), 0)


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
    fake.server.publish()  # the client reads its snapshot of the server, not the server
    _, state, signals = env._observe(image_now(fake))
    assert signals.lateral_offset == pytest.approx(1.0) and state[1] == pytest.approx(1.0)
    np.testing.assert_allclose(state[base.lane_point_slice(3)].reshape(3, 2), [[4, -1], [8, -1], [12, -1]], atol=1e-5)

    car.transform.location.y, car.transform.rotation.yaw, car.speed = LANES_Y[0], 10.0, 5.0
    fake.server.publish()
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
    fake.server.publish()
    _, state, _ = env._observe(image_now(fake))
    assert state[base.LEAD_GAP] == pytest.approx(15.0, abs=1e-4)
    assert state[base.LEAD_CLOSING] == pytest.approx(8.0 - 3.0, abs=1e-4)

    env.cfg.lead_vehicle = False  # the ablation: the same scene reads "nobody ahead"
    _, state, _ = env._observe(image_now(fake))
    assert (state[base.LEAD_GAP], state[base.LEAD_CLOSING]) == (base.LEAD_RANGE_M, 0.0)
    env.cfg.lead_vehicle = True

    npcs[0].transform.location.x = x0 + base.LEAD_RANGE_M + 5.0  # out of range: nobody ahead
    fake.server.publish()
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
    ego(fake).transform.location.y = LANES_Y[0] - 2 * LANE_WIDTH  # beyond the oncoming lane: off the road
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert info["off_road"] and terminated
    env.close()


# ----------------------------------------------------------------------------------------- frame matching
def test_stale_camera_image_is_skipped_and_the_ticks_frame_is_used():
    env, fake, _ = make_env(**{"image.stack": 2})
    env.reset(seed=0)
    fake.server.stale_images = True  # every tick now first delivers an image of the previous frame
    env._inbox.image(image_now(fake))  # and one left over from an earlier tick is already waiting
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
def claims_left() -> list[str]:
    return [e.name for e in os.scandir(claim_dir())]


def test_close_stops_sensors_then_destroys_all_actors_in_one_batch_then_restores_settings():
    fake = FakeCarlaModule()
    fake.server.settings.fixed_delta_seconds = 0.0  # the server's own settings before we touch it
    env, _, _ = make_env(fake, npcs=5, load_world=False)
    env.reset(seed=0)
    sensor_ids = [a.id for a in fake.server.of_type("sensor.")]
    vehicle_ids = [a.id for a in fake.server.of_type("vehicle.")]
    assert len(vehicle_ids) == 6 and len(sensor_ids) == 3
    assert len(fake.server.on_tick) == 1
    start = len(fake.server.calls)
    env.close()
    tail = fake.server.calls[start:]
    assert [c[0] for c in tail] == ["stop", "stop", "stop", "apply_batch_sync", "apply_settings",
                                    "tm.set_synchronous_mode"]
    assert sorted(c[1] for c in tail[:3]) == sorted(sensor_ids)
    assert tail[3][1] == ["DestroyActor"] * 9
    assert tail[4] == ("apply_settings", False, 0.0, False) and tail[5] == ("tm.set_synchronous_mode", False)
    assert fake.server.actors == {} and fake.server.on_tick == {}
    assert claims_left() == []  # port claims released
    env.close()  # a second close is harmless
    assert fake.server.calls[start + len(tail):] == []


def test_reset_respawns_the_npcs_and_moves_the_ego():
    env, fake, _ = make_env(npcs=6)
    env.reset(seed=0)
    ego_id = ego(fake).id
    npcs = {a.id for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None}
    assert len(npcs) == 6
    env.reset(seed=1)
    assert ego(fake).id == ego_id  # the ego and its sensors stay
    fresh = {a.id for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None}
    assert len(fresh) == 6 and not fresh & npcs  # the NPCs were destroyed and spawned again
    assert len(calls(fake, "set_transform")) == 2  # one teleport per reset
    env.close()


def traffic(fake: FakeCarlaModule) -> tuple:
    """The ego's start and every NPC's blueprint and spawn point, as the server holds them."""
    car = ego(fake)
    npcs = sorted((a.type_id, a.transform.location.x, a.transform.location.y)
                  for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None)
    return (car.transform.location.x, car.transform.location.y), tuple(npcs)


def test_same_seed_gives_the_same_npc_spawns_and_blueprints_in_every_episode():
    """Two runs, three episodes each: the episode seed alone decides the ego's start and the NPCs' spawn points and
    blueprints (and the Traffic Manager's seed), so an evaluation episode is the same at every evaluation."""
    runs = []
    for _ in range(2):
        env, fake, _ = make_env(npcs=8, seed=None)
        episodes = []
        for seed in (3, 4, 3):
            env.reset(seed=seed)
            episodes.append((traffic(fake), fake.traffic_managers[8000].seed))
        env.close()
        runs.append(episodes)
    assert runs[0] == runs[1]
    assert runs[0][0] == runs[0][2] and runs[0][0] != runs[0][1]
    starts, npcs = runs[0][0][0]
    assert len(npcs) == 8 and len({n[0] for n in npcs}) > 1  # several blueprints drawn
    assert all(math.dist(starts, n[1:]) > 10.0 for n in npcs)  # none on top of the ego


def test_npc_types_choose_the_blueprints():
    env, fake, _ = make_env(npcs=12)
    env.reset(seed=0)
    cars = {"vehicle.audi.a2", "vehicle.citroen.c3", "vehicle.nissan.micra", "vehicle.tesla.model3"}
    assert {n[0] for n in traffic(fake)[1]} <= cars  # default: cars only, no bus, truck or bike
    env.close()
    env, fake, _ = make_env(npcs=12, npc_types=["truck", "bus"])
    env.reset(seed=0)
    assert {n[0] for n in traffic(fake)[1]} == {"vehicle.carlamotors.carlacola", "vehicle.mitsubishi.fusorosa"}
    env.close()
    with pytest.raises(ConfigError, match=r"env.carla.npc_types=\['lorry'\].*car, van, truck"):
        make_env(npc_types=["lorry"])


def test_occupied_spawn_points_fall_back_to_free_ones():
    """A point another client's car occupies fails to spawn: the NPCs take the next free ones in the seeded
    order, and the ego at start-up takes the next free start (try_spawn_actor, no exception)."""
    fake = FakeCarlaModule()
    env, _, _ = make_env(fake, npcs=25, load_world=False)
    blockers = [fake.server.spawn(ActorBlueprint("vehicle.audi.a2"), Transform(Location(x, LANES_Y[1])))
                for x in SPAWN_X]  # another client takes the middle lane after we started
    fake.server.publish()
    env.reset(seed=0)
    start = traffic(fake)[0]
    free = {(float(x), y) for x in SPAWN_X for y in (LANES_Y[0], LANES_Y[2]) if math.dist((x, y), start) > 10.0}
    npcs = [a for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None]
    assert len(free) < 25 and {(a.transform.location.x, a.transform.location.y) for a in npcs} == free
    assert all(b.id in fake.server.actors for b in blockers)  # another client's cars are left alone
    env.close()

    fake = FakeCarlaModule()
    tried = []
    real_blocked = fake.server.blocked

    def first_two_taken(transform):
        tried.append((transform.location.x, transform.location.y))
        return len(tried) <= 2 or real_blocked(transform)

    fake.server.blocked = first_two_taken
    env, _, _ = make_env(fake)
    assert len(calls(fake, "try_spawn_actor")) == 3 and len(set(tried[:3])) == 3
    assert (ego(fake).transform.location.x, ego(fake).transform.location.y) == tried[2]
    env.close()


def test_start_up_loads_the_town_or_destroys_strays_and_forces_the_settings(caplog):
    fake = FakeCarlaModule()
    fake.server.settings.synchronous_mode = True  # left so by a run that never closed
    fake.server.settings.no_rendering_mode = True
    leftovers = [fake.server.spawn(ActorBlueprint("vehicle.audi.a2"), Transform(Location(x, y)))
                 for x in SPAWN_X[:-1] for y in LANES_Y]
    camera = fake.server.spawn(ActorBlueprint("sensor.camera.rgb"), Transform())
    with caplog.at_level(logging.WARNING):
        env, _, _ = make_env(fake, npcs=0, load_world=False)
    assert "already in synchronous mode" in caplog.text and "destroying 28 vehicles and sensors" in caplog.text
    assert calls(fake, "load_world") == []
    assert not {car.id for car in leftovers} & set(fake.server.actors) and camera.id not in fake.server.actors
    names = [c[0] for c in fake.server.calls]
    assert calls(fake, "apply_settings")[0][1] is False  # made asynchronous first ...
    assert names.index("apply_settings") < names.index("apply_batch_sync")  # ... before the strays go
    assert calls(fake, "apply_settings")[-1] == ("apply_settings", True, 0.05, False)  # rendering forced on
    env.close()
    assert calls(fake, "apply_settings")[-1][1] is False  # never handed back synchronous

    env, fake, _ = make_env(FakeCarlaModule(), load_world=True)  # the default: a fresh town, same map or not
    assert [c[1] for c in calls(fake, "load_world")] == ["Town01"]
    env.close()


def test_world_is_loaded_with_a_long_time_out():
    env, fake, _ = make_env(FakeCarlaModule(town="Town01"), town="Town02", load_world=False)
    assert [c[1] for c in calls(fake, "load_world")] == ["Town02"]  # another town is loaded even so
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
    assert truncated and not terminated and reward == 0.0 and info["interrupted"]
    assert info["reconnects"] == 1 and sleeps == [1.0]
    np.testing.assert_array_equal(obs["image"], good["image"])
    np.testing.assert_array_equal(obs["state"], good["state"])
    assert len(fake.server.clients) == 2
    # the town was taken over again (old actors gone) and the ego rebuilt once: no leak; NPCs come at reset
    assert not old_actors & set(fake.server.actors) and len(fake.server.actors) == 1 + 3
    assert len(fake.traffic_managers) == 1  # the process's one Traffic Manager, still bound to a live server
    obs, info = env.reset(seed=1)
    assert info["reconnects"] == 1 and len(fake.server.actors) == 1 + 3 + 4
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert not terminated and not truncated and info["reconnects"] == 1
    env.close()


def test_server_restart_aborts_an_in_process_env():
    """What the real client does when the server process restarts under it: the per-process Traffic Manager is
    bound to the dead server and its worker thread aborts the process at the next tick (carla#7597). Only a
    fresh process survives that (issue #23, item 1); here the double shows the abort."""
    env, fake, _ = make_env()
    env.reset(seed=0)
    fake.server.restart()
    with pytest.raises(carla_double.ProcessAborted):
        env.step(np.zeros(2))
    env._tm = None  # the abort ends the process; nothing of it is cleaned up
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


def test_time_out_during_reset_is_retried_with_the_same_draws():
    reference, fake_ref, _ = make_env()
    reference.reset(seed=0)
    expected = traffic(fake_ref)
    reference.close()
    env, fake, sleeps = make_env()
    fake.server.timeouts_on_tick = 2  # the reset's tick, then the rebuild's tick after the first reconnect
    obs, info = env.reset(seed=0)
    assert info["reconnects"] == 1 and sleeps == [1.0, 2.0]
    assert env.observation_space.contains(obs)
    assert traffic(fake) == expected
    env.close()


def test_unreachable_server_at_start_is_env_unavailable():
    fake = FakeCarlaModule()
    fake.server.down = True
    with pytest.raises(EnvUnavailableError, match=r"somehost:2345.*docker compose -f docker/compose.yaml up"):
        make_env(fake, host="somehost", port=2345)
    assert claims_left() == []


def test_a_slow_first_frame_waits_first_frame_timeout_s_not_timeout_s():
    """A cold server's first frames can take longer than a step's time-out; only the first is given longer."""
    fake = FakeCarlaModule()
    fake.server.delays["image"] = 0.4
    env, _, _ = make_env(fake, timeout_s=0.2, first_frame_timeout_s=5.0)
    assert calls(fake, "tick")[0] == ("tick", 5.0) and calls(fake, "tick")[-1] == ("tick", 5.0)
    fake.server.delays["image"] = 0.0
    env.reset(seed=0)
    assert calls(fake, "tick")[-1] == ("tick", 0.2)
    env.close()
    fake = FakeCarlaModule()
    fake.server.delays["image"] = 0.4
    with pytest.raises(EnvUnavailableError, match="localhost:2000 answers, but its camera sent no image in 10 ticks"):
        make_env(fake, timeout_s=0.2, first_frame_timeout_s=0.2)


def test_a_camera_whose_first_images_come_late_is_ticked_until_they_flow():
    """#35: a synchronous server renders only when ticked, and a new camera's first image can come frames after
    it was spawned: the take-over ticks again (a bounded number of times) instead of waiting on one frame."""
    fake = FakeCarlaModule()
    fake.server.first_image_after = 3
    env, _, _ = make_env(fake, first_frame_timeout_s=2.0)
    assert len(calls(fake, "tick")) == 4  # three frames without an image, then one with
    env.reset(seed=0)
    env.close()


def test_a_server_whose_frames_do_not_arrive_names_the_streaming_port():
    """#35: RPC answers (port 2000) but the frames, which come on port 2001, never arrive: not 'cannot reach'."""
    fake = FakeCarlaModule()
    fake.server.streaming = False
    with pytest.raises(EnvUnavailableError, match=r"localhost:2000 answers, but no frame reached this client.*"
                                                  r"streaming port 2001: publish ports 2000-2002") as caught:
        make_env(fake)
    assert "cannot reach" not in str(caught.value) and claims_left() == []


def test_a_server_that_cannot_render_names_off_screen_rendering():
    fake = FakeCarlaModule()
    fake.server.rendering = False
    start = time.monotonic()
    with pytest.raises(EnvUnavailableError, match=r"answers, but its camera sent no image in 10 ticks \(0.5 s, "
                                                  r"env.carla.first_frame_timeout_s\).*-RenderOffScreen.*port 2001"):
        make_env(fake, first_frame_timeout_s=0.5)
    assert time.monotonic() - start < 2.0 and len(calls(fake, "tick")) == 10  # bounded: ticks and time


# ------------------------------------------------------------------------------------------- frame-stamped events
def test_a_late_collision_event_counts_at_its_own_frame():
    """The collision of frame N arrives on its own stream after the frame's camera image: with env.event_wait_s
    long enough it still counts at step N; with 0 it counts at step N + 1 (late, never lost)."""
    for wait, step_counted in ((0.3, 0), (0.0, 1)):
        env, fake, _ = make_env(event_wait_s=wait, **{"route.start_index": 0})
        env.reset(seed=0)
        fake.server.delays["collision"] = 0.1
        fake.server.collide_at = {fake.server.frame + 1}
        flags = []
        for _ in range(2):
            _, _, terminated, _, info = env.step(np.zeros(2))
            flags.append(info["collision"])
            if terminated:
                break
            assert fake.server.delivery.idle()  # the late event is in before the next step
        assert flags.index(True) == step_counted, (wait, flags)
        env.close()


def test_an_event_of_a_later_frame_waits_for_its_own_step():
    env, fake, _ = make_env(**{"route.start_index": 0})
    env.reset(seed=0)
    env._inbox.collision(carla_double.CollisionEvent(fake.server.frame + 2))  # stamped two ticks ahead
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert not info["collision"] and not terminated
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert info["collision"] and terminated
    env.close()


def test_lane_invasion_arriving_with_the_on_tick_callbacks_counts_at_its_step():
    env, fake, _ = make_env(**{"route.start_index": 0})
    env.reset(seed=0)
    fake.server.delays["on_tick"] = 0.1  # the client-side sensor runs on the on-tick thread, after tick()
    ego(fake).transform.location.y = LANES_Y[0] + LANE_WIDTH / 2 - 0.01
    ego(fake).transform.rotation.yaw = 80.0
    ego(fake).speed = 5.0
    _, _, _, _, info = env.step(np.zeros(2))
    assert info["lane_invasion"]
    env.close()


# ------------------------------------------------------------------------------ every config key takes effect
def test_connection_keys_reach_the_client():
    env, fake, _ = make_env(host="carla-box", port=2010, tm_port=8010, timeout_s=3.5, npcs=2)
    assert calls(fake, "Client")[0] == ("Client", "carla-box", 2010)
    assert ("set_timeout", 3.5) in fake.server.calls
    assert calls(fake, "get_trafficmanager") == [("get_trafficmanager", 8010)]
    env.reset(seed=0)
    npcs = [a for a in fake.server.of_type("vehicle.") if a.autopilot_port is not None]
    assert [a.autopilot_port for a in npcs] == [8010, 8010]
    env.step(np.zeros(2))
    assert calls(fake, "tick")[-1] == ("tick", 3.5)  # world.tick waits timeout_s
    env.close()


def test_simulation_keys_reach_the_world():
    env, fake, _ = make_env(fixed_delta_s=0.02, weather="HardRainNoon", npcs=7)
    assert ("apply_settings", True, 0.02, False) in fake.server.calls
    assert fake.traffic_managers[8000].synchronous
    assert fake.server.weather.name == "HardRainNoon"
    assert env.reward_fn.dt == 0.02
    ticks = len(calls(fake, "tick"))
    env.reset(seed=5)
    assert len([a for a in fake.server.of_type("vehicle.") if a.autopilot_port]) == 7
    # one batch spawns the NPCs, each with autopilot, after the Traffic Manager was seeded from the episode seed
    assert calls(fake, "apply_batch_sync")[-1][1] == ["SpawnActor"] * 7
    names = [c[0] for c in fake.server.calls]
    assert names.index("tm.set_random_device_seed") < len(names) - 1 - names[::-1].index("apply_batch_sync")
    assert len(calls(fake, "tick")) - ticks == math.ceil(0.5 / 0.02)  # settling takes SETTLE_S at this delta
    env.close()
    with pytest.raises(ConfigError, match="env.carla.weather='Sunny'.*ClearNoon"):
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
    with pytest.raises(ConfigError, match="env.carla.route.start_index=99 but Town01 has 30 spawn points"):
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


# ------------------------------------------------------------------------------------------- shared servers
def test_warns_when_another_live_process_uses_the_same_server(caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = claim_path(server_key("127.0.0.1", 2000))  # the same server under its address (#35)
        with open(path, "w") as f:
            f.write(str(holder.pid))
        with caplog.at_level(logging.WARNING):
            env, _, _ = make_env()  # host=localhost
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


def test_the_traffic_manager_port_defaults_to_the_server_port_plus_6000():
    """#35: env.carla.tm_port=null (the default): each job with its own server gets its own Traffic Manager port,
    so two jobs on one machine do not clash on 8000; the NPCs are driven through it."""
    env, fake, _ = make_env(port=2004, npcs=2)
    assert env.cfg.carla.tm_port is None and calls(fake, "get_trafficmanager") == [("get_trafficmanager", 8004)]
    env.reset(seed=0)
    assert {a.autopilot_port for a in fake.server.of_type("vehicle.") if a.autopilot_port} == {8004}
    assert "carla_tm_8004.lock" in {p.name for p in claim_dir().iterdir()}
    env.close()


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
        CarlaSession(carla_cfg(host="127.0.0.1", port=port, timeout_s=2.0), 0)
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


# ------------------------------------------------------------------------------------ the double is strict
def test_double_signatures_match_the_installed_client():
    """Every call whose argument kinds the double declares has, in the installed ``carla`` wheel, a parameter of
    that name (or, for calls with several overloads, at that position) and of that Boost.Python type."""
    carla = pytest.importorskip("carla")
    import inspect
    import re

    d = carla_double
    pairs = {
        d.Vector3D.__init__: carla.Vector3D.__init__, d.Rotation.__init__: carla.Rotation.__init__,
        d.VehicleControl.__init__: carla.VehicleControl.__init__,
        d.ActorBlueprint.set_attribute: carla.ActorBlueprint.set_attribute,
        d.ActorBlueprint.has_attribute: carla.ActorBlueprint.has_attribute,
        d.ActorBlueprint.get_attribute: carla.ActorBlueprint.get_attribute,
        d.BlueprintLibrary.find: carla.BlueprintLibrary.find, d.BlueprintLibrary.filter: carla.BlueprintLibrary.filter,
        d.Actor.set_transform: carla.Actor.set_transform, d.Actor.set_target_velocity: carla.Actor.set_target_velocity,
        d.Actor.set_target_angular_velocity: carla.Actor.set_target_angular_velocity,
        d.Actor.apply_control: carla.Vehicle.apply_control, d.ActorList.filter: carla.ActorList.filter,
        d.Waypoint.next: carla.Waypoint.next, d.Map.get_waypoint: carla.Map.get_waypoint,
        d.TrafficManager.set_synchronous_mode: carla.TrafficManager.set_synchronous_mode,
        d.TrafficManager.set_random_device_seed: carla.TrafficManager.set_random_device_seed,
        d.World.apply_settings: carla.World.apply_settings, d.World.spawn_actor: carla.World.spawn_actor,
        d.World.try_spawn_actor: carla.World.try_spawn_actor, d.World.get_actors: carla.World.get_actors,
        d.World.remove_on_tick: carla.World.remove_on_tick, d.World.tick: carla.World.tick,
        d.SpawnActor.__init__: carla.command.SpawnActor.__init__,
        d.SetAutopilot.__init__: carla.command.SetAutopilot.__init__,
        d.DestroyActor.__init__: carla.command.DestroyActor.__init__, d.Client.__init__: carla.Client.__init__,
        d.Client.set_timeout: carla.Client.set_timeout,
        d.Client.load_world: carla.Client.load_world, d.Client.get_trafficmanager: carla.Client.get_trafficmanager,
        d.Client.apply_batch_sync: carla.Client.apply_batch_sync,
    }
    boost_name = {float: "float", int: "int", bool: "bool", str: "str", list: "list", type(None): None}
    for fake, real in pairs.items():
        # One overload per "name( (Type)arg, ...) -> ..." line; the first parameter is self.
        overloads = [re.findall(r"\((\w+)\)(\w+)", line)[1:] for line in real.__doc__.splitlines()
                     if re.match(r"\s*\w+\(", line)]
        params = [p for p in inspect.signature(fake.__wrapped__).parameters if p != "self"]
        if fake is d.Client.__init__:
            params = params[1:]
        for name, kind in fake.carla_kinds.items():
            i = params.index(name)
            for k in kind if isinstance(kind, tuple) else (kind,):
                want = boost_name.get(k, getattr(k, "__name__", None))
                if want is None:
                    continue
                union = isinstance(kind, tuple)
                # argN: the wheel leaves that parameter unnamed; only its type can be checked. Boost.Python
                # prints some C++ int parameters under an enum's name (GBufferTextureID), as in VehicleControl.gear.
                names = {want, "GBufferTextureID"} if want == "int" else {want}
                assert any(len(o) > i and o[i][0] in names and (union or o[i][1] in (name, f"arg{i + 2}"))
                           for o in overloads), (
                    f"{fake.__qualname__}({name}: {want}) is not in the wheel's {overloads}")
    assert [p for p in inspect.signature(d.World.tick.__wrapped__).parameters.values()][1].default == 0.0


@pytest.mark.parametrize("module", ["double", "wheel"])
def test_numpy_scalars_are_refused_like_the_real_client(module):
    """np.float64 subclasses float and passes; np.float32 and np.int64 do not, on the double as on the wheel."""
    carla = FakeCarlaModule() if module == "double" else pytest.importorskip("carla")
    errors = (TypeError,)  # Boost.Python.ArgumentError subclasses TypeError; so does the double's
    with pytest.raises(errors):
        carla.command.DestroyActor(np.int64(1))
    with pytest.raises(errors):
        carla.VehicleControl(throttle=np.float32(0.5))
    with pytest.raises(errors):
        carla.Location(x=np.float32(1.0))
    with pytest.raises(errors):
        carla.command.SetAutopilot(1, True, np.int64(8000))
    carla.VehicleControl(throttle=np.float64(0.5), steer=1, brake=True)
    carla.command.DestroyActor(1)


def test_double_refuses_what_the_real_client_refuses_beyond_constructors():
    fake = FakeCarlaModule()
    world = fake.Client("localhost", 2000).get_world()
    with pytest.raises(carla_double.ArgumentError):
        world.get_actors((1, 2))  # boost::python::list: a tuple does not convert
    with pytest.raises(carla_double.ArgumentError):
        world.tick(np.float32(1.0))
    with pytest.raises(carla_double.ArgumentError):
        fake.Client("localhost", np.int64(2000))
    with pytest.raises(carla_double.ArgumentError):
        carla_double.Transform(None)


def test_double_tick_in_asynchronous_mode_returns_the_next_frame_like_the_client():
    """#35: the real client's tick() in asynchronous mode waits for the server's next frame; it raises nothing."""
    fake = FakeCarlaModule()
    world = fake.Client("localhost", 2000).get_world()
    assert not world.get_settings().synchronous_mode
    frame = fake.server.frame
    assert world.tick(1.0) == frame + 1


def test_double_traffic_manager_forgets_its_vehicles_when_the_map_is_loaded():
    """#35: TrafficManagerLocal::Reset on an episode change; and an actor of the old episode is a destroyed one."""
    env, fake, _ = make_env(npcs=3)
    env.reset(seed=0)
    tm = fake.traffic_managers[8000]
    assert len(tm.registered) == 3
    car = env._ego
    fake.Client("localhost", 2000).load_world("Town01")
    assert tm.registered == set() and tm.synchronous  # its parameters (synchronous mode) stay
    with pytest.raises(RuntimeError, match="trying to operate on a destroyed actor"):
        car.apply_control(carla_double.VehicleControl())
    env.close()


def test_double_delivers_callbacks_after_tick_and_reads_cached_snapshots():
    env, fake, _ = make_env()
    env.reset(seed=0)
    world, car = env._world, ego(fake)
    fake.server.delays["image"] = 0.2
    got = []
    world.on_tick(lambda snapshot: got.append(snapshot.frame))
    frame = world.tick(1.0)
    assert got == []  # nothing arrives inside tick()
    assert fake.server.delivery.idle() and got == [frame]
    before = car.get_transform().location.x
    car.set_transform(Transform(Location(before + 30.0, LANES_Y[0])))
    assert car.get_transform().location.x == before  # a snapshot of the last tick, not the server
    fake.server.down = True
    assert car.get_transform().location.x == before  # and no server call
    fake.server.down = False
    world.tick(1.0)
    assert car.get_transform().location.x == pytest.approx(before + 30.0)
    tm = fake.Client("localhost", 2000).get_trafficmanager(8000)
    assert tm is env._tm  # one per process and port
    env.close()


# ------------------------------------------------------------------------------------- curves and junctions
def test_route_through_a_junction_takes_a_seeded_branch_and_the_lane_points_follow_the_curve():
    """From the right lane just before the junction, a seeded branch: straight on, or the right turn. On the turn
    the lane points ahead bend to the right (y < 0 in the ego frame)."""
    ends = {}
    for seed in range(8):
        env, fake, _ = make_env(**{"route.start_index": 29, "route.length_m": 60.0, "lane_points": 5,
                                   "lane_point_spacing": 4.0})
        _, info = env.reset(seed=seed)
        end_y = -env._route.xy[-1, 1]  # back in CARLA's frame
        ends[seed] = "turn" if end_y > 20.0 else "straight"
        if ends[seed] == "turn":
            car = ego(fake)
            car.transform.location.x = 200.0  # at the junction's entry, heading along +x
            fake.server.publish()
            _, state, signals = env._observe(image_now(fake))
            points = state[base.lane_point_slice(5)].reshape(5, 2)
            assert np.all(points[2:, 1] < -0.5) and abs(signals.lateral_offset) < 0.5
        env.close()
    assert set(ends.values()) == {"turn", "straight"}
    again, _, _ = make_env(**{"route.start_index": 29, "route.length_m": 60.0})
    again.reset(seed=3)
    assert ("turn" if -again._route.xy[-1, 1] > 20.0 else "straight") == ends[3]
    again.close()


# ------------------------------------------------------------------------------------------------ port claims
def test_port_claims_live_in_a_private_directory_and_refuse_a_planted_one(tmp_path):
    env, _, _ = make_env()
    assert oct(os.stat(claim_dir()).st_mode & 0o777) == "0o700"
    assert {p.name for p in claim_dir().iterdir()} == {"carla_127.0.0.1_2000.lock", "carla_tm_8000.lock"}
    env.close()
    path = claim_dir()
    os.rmdir(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, path)  # someone plants a link where our directory goes
    with pytest.raises(ConfigError, match="not a private directory"):
        make_env()
    assert list(elsewhere.iterdir()) == []


# -------------------------------------------------------------------------------- worker process and restarts
class FakeClock:
    """``sleep`` advances ``now``; ``on_sleep`` lets a test bring the server back at some time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda now: None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep(self.now)

    def __call__(self) -> float:
        return self.now


def worker_env(fake: FakeCarlaModule | None = None, seed: int | None = 0, **overrides):
    fake = fake or FakeCarlaModule()
    start, clock = carla_double.inline_workers(fake.server), FakeClock()
    env = CarlaDrivingEnv(carla_cfg(**overrides), seed, start=start, sleep=clock.sleep, clock=clock)
    return env, fake, start, clock


def test_server_restart_restarts_the_worker_and_truncates_the_episode():
    env, fake, start, clock = worker_env()
    env.reset(seed=0)
    good, *_ = env.step(np.array([0.0, 1.0]))
    first = start.started[0]
    fake.server.restart()  # the server process dies and comes back: the worker's Traffic Manager is stale
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0]))
    assert truncated and not terminated and reward == 0.0 and info["reconnects"] == 1 and info["interrupted"]
    assert set(base.INFO_KEYS) <= set(info) and tuple(info["reward_components"]) == backends.CARLA.reward_components
    assert info["termination"] == ""
    np.testing.assert_array_equal(obs["state"], good["state"])  # the last good observation
    assert len(start.started) == 2 and not first.alive and start.started[1].module is not first.module
    assert env.restarts == 1 and clock.sleeps == []  # the server was back: no wait
    obs, info = env.reset(seed=1)  # the fresh worker took the server over; training goes on
    assert info["reconnects"] == 1 and env.observation_space.contains(obs)
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert not terminated and not truncated
    assert len([a for a in fake.server.of_type("vehicle.") if a.autopilot_port]) == 4
    env.close()
    assert fake.server.actors == {}


def test_a_reset_that_loses_the_server_is_replayed_on_a_fresh_worker():
    reference, ref_fake, _, _ = worker_env()
    reference.reset(seed=2)
    expected = traffic(ref_fake)
    reference.close()
    env, fake, start, _ = worker_env()
    fake.server.restart()
    obs, info = env.reset(seed=2)
    assert info["reconnects"] == 1 and len(start.started) == 2 and traffic(fake) == expected
    env.close()


@pytest.mark.parametrize("minutes, back_after_s, recovers", [(2.0, 90.0, True), (1.0, 90.0, False),
                                                             (0.5, None, False)])
def test_server_lost_minutes_is_the_window_before_giving_up(minutes, back_after_s, recovers):
    """The server goes away; the env restarts workers with back-off for env.server_lost_minutes. A server back
    within the window continues the run; otherwise SimulatorLostError says how long and how to resume."""
    env, fake, start, clock = worker_env(server_lost_minutes=minutes)
    env.reset(seed=0)
    attempts: list[float] = []  # when each fresh worker was tried
    inner = env._start
    env._start = lambda *a: (attempts.append(clock.now), inner(*a))[1]
    fake.server.down = True
    if back_after_s is not None:
        clock.on_sleep = lambda now: setattr(fake.server, "down", now < back_after_s)
    if recovers:
        _, _, _, truncated, info = env.step(np.zeros(2))
        assert truncated and info["reconnects"] >= 1 and clock.now >= back_after_s
        env.reset(seed=1)
    else:
        with pytest.raises(SimulatorLostError, match=rf"no CARLA server at localhost:2000 for {minutes:g} minute.*"
                                                     r"env.carla.server_lost_minutes.*rerun the same command"):
            env.step(np.zeros(2))
        assert clock.now == pytest.approx(minutes * 60.0)
        assert attempts[:4] == [0.0, 1.0, 3.0, 7.0]  # back-off between restarts: 1 s, 2 s, 4 s
        assert max(clock.sleeps) <= carla_worker.STOP_POLL_S  # in slices: a stop signal is noticed meanwhile
    env.close()


def test_non_finite_actions_are_refused_before_the_worker():
    env, fake, _, _ = worker_env()
    env.reset(seed=0)
    n = len(calls(fake, "apply_control"))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.inf, 0.0]))
    assert len(calls(fake, "apply_control")) == n
    env.close()


class SlowEnv:
    """A picklable stand-in for a session, for the process plumbing (the double cannot cross processes)."""

    def __init__(self, cfg: EnvConfig, seed: int | None, supervisor=None) -> None:
        self.supervisor = supervisor
        if cfg.carla.port == 1:
            raise EnvUnavailableError("cannot reach the CARLA server at localhost:1")

    def pid(self) -> int:
        return os.getpid()

    def hang(self) -> None:
        time.sleep(60)

    def busy(self, seconds: float) -> str:
        """A long call that reports progress, as a session's reconnect loop does."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.supervisor.alive()
            time.sleep(0.1)
        return "done"

    def warn(self, text: str) -> None:
        """Log a warning as the session does, from this thread, from another thread, with an argument that does
        not pickle, and a debug line below the trainer's level."""
        log = logging.getLogger("av_td3.envs.carla.env")
        log.warning("main thread: %s", text)
        thread = threading.Thread(target=log.warning, args=("callback thread: %s", text))
        thread.start()
        thread.join()
        log.warning("unpicklable: %s", threading.Lock())
        log.debug("debug: %s", text)

    def back_off(self, seconds: float) -> tuple[bool, float]:
        """A reconnect back-off: (stop pending after it, seconds it lasted)."""
        t0 = time.monotonic()
        self.supervisor.wait(seconds)
        return self.supervisor.stop_pending(), time.monotonic() - t0

    def close(self) -> None:
        pass


def test_process_worker_runs_in_its_own_process_and_reports_its_death():
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv)
    pid = worker.call("pid")
    assert pid != os.getpid()
    os.kill(pid, 9)  # e.g. the CARLA client aborting the process
    with pytest.raises(carla_worker.WorkerDied, match="ended"):
        worker.call("pid")
    worker.kill()
    with pytest.raises(EnvUnavailableError, match="localhost:1"):  # the constructor's error crosses over
        carla_worker.ProcessWorker(carla_cfg(port=1), 0, watchdog_s=30.0, factory=SlowEnv)
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv)
    worker.watchdog_s = 1.0  # started; now a call that hangs
    with pytest.raises(carla_worker.WorkerDied, match="silent for 1 s"):
        worker.call("hang")
    worker.kill()


def test_the_watchdog_is_derived_from_the_time_outs_not_from_the_reconnect_count():
    """#35 item 4: the trainer kills a worker after twice the longest wait a healthy one spends between two progress
    reports, not after a whole reconnect loop's worth (1,500 s at the defaults before)."""
    defaults = EnvConfig(name="carla")
    assert carla_worker.watchdog_s(defaults) == 120.0  # 2 x max(60 s town load, first_frame_timeout_s 60, 2 x 10 s)
    assert carla_worker.watchdog_s(carla_cfg(timeout_s=100.0)) == 400.0  # a tick plus its image, twice
    assert carla_worker.watchdog_s(carla_cfg(first_frame_timeout_s=300.0)) == 600.0
    assert carla_worker.watchdog_s(carla_cfg(max_reconnects=10)) == carla_worker.watchdog_s(carla_cfg())


def test_a_worker_that_reports_progress_outlives_the_watchdog_a_silent_one_does_not():
    """#35 item 4: progress reports (each tick, each reconnect attempt) renew the deadline of the call under way."""
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv)
    worker.watchdog_s = 1.0
    assert worker.call("busy", 2.5) == "done"  # 2.5 s, reporting every 0.1 s
    with pytest.raises(carla_worker.WorkerDied, match="silent for 1 s"):
        worker.call("hang")
    worker.kill()


def test_a_stop_pending_in_the_trainer_cuts_the_workers_back_off_short():
    """#35 item 4: the trainer passes a pending stop on while it waits for an answer; the worker's back-off wait
    returns at once and sees it (the session's reconnect loop then raises StopRequested)."""
    pending = [False]
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv,
                                        stop_pending=lambda: pending[0])
    assert worker.call("back_off", 0.2)[0] is False
    pending[0] = True
    stopped, lasted = worker.call("back_off", 30.0)
    assert stopped and lasted < 5.0
    worker.kill()


def test_worker_warnings_reach_the_trainers_log(caplog):
    """#35 item 7: the spawned worker configured no logging, so its warnings (reconnects, strays destroyed, a server
    already synchronous) went to its stderr only. They now reach the trainer's logger of the same name, from any
    of the worker's threads, in order, before the call's answer; below the trainer's level nothing is sent."""
    caplog.set_level(logging.WARNING)
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv)
    worker.call("warn", "reconnecting")
    records = [r for r in caplog.records if r.processName == "carla-worker"]
    assert [r.getMessage() for r in records[:2]] == ["main thread: reconnecting", "callback thread: reconnecting"]
    assert records[2].getMessage().startswith("unpicklable: <unlocked _thread.lock")
    assert all(r.name == "av_td3.envs.carla.env" and r.levelno == logging.WARNING for r in records)
    assert len(records) == 3 and records[0].process == worker.call("pid") != os.getpid()
    worker.kill()


def test_the_reconnect_loop_stops_at_a_pending_stop_instead_of_reconnecting():
    """#35 item 4: a stop signal arrives during the first reconnect back-off. The session raises StopRequested
    before connecting again (before: every one of env.carla.max_reconnects attempts ran, each could load the town,
    and only then did the trainer side notice the stop)."""
    env, fake, start, clock = worker_env(max_reconnects=3)
    env.reset(seed=0)
    pending = [False]
    env.stop_pending = lambda: pending[0]
    start.started[0].supervisor.wait = lambda seconds: pending.__setitem__(0, True)  # the signal comes meanwhile
    fake.server.down = True
    clients = len(calls(fake, "Client"))
    with pytest.raises(base.StopRequested, match="while the run is stopping: no reconnect"):
        env.step(np.zeros(2))
    assert len(calls(fake, "Client")) == clients and len(start.started) == 1
    env.close()


def test_a_stop_during_a_worker_restart_back_off_is_noticed_within_a_second():
    """#35 item 4: the trainer side's restart back-off (up to 30 s) asks every STOP_POLL_S whether a stop is
    pending (before: it slept the whole back-off)."""
    env, fake, _, clock = worker_env(max_reconnects=0)
    env.reset(seed=0)
    fake.server.down = True
    env.stop_pending = lambda: clock.now >= 4.0  # during the third back-off (4 s, from t = 3 s)
    with pytest.raises(base.StopRequested, match="no worker restarted"):
        env.step(np.zeros(2))
    assert clock.now == 4.0
    env.close()


def test_the_session_reports_progress_at_each_tick_and_reconnect_attempt():
    """#35 item 4: what keeps the watchdog from killing a healthy worker: a report per tick, per reconnect attempt,
    per connection and per town loaded."""
    env, fake, start, _ = worker_env(max_reconnects=3)
    env.reset(seed=0)
    supervisor = start.started[0].supervisor
    before = supervisor.reports
    env.step(np.zeros(2))
    assert supervisor.reports == before + 1  # the step's tick
    fake.server.timeouts_on_tick = 1
    before = supervisor.reports
    _, _, _, truncated, info = env.step(np.zeros(2))
    assert truncated and info["interrupted"] and supervisor.waits == [1.0]
    # the attempt, its connection, the town loaded, and at least one first-image tick
    assert supervisor.reports >= before + 4
    env.close()


class ClosingEnv(SlowEnv):
    """SlowEnv that leaves a file behind when it is closed (the path in AV_TD3_TEST_CLOSED, which the spawned
    worker inherits), so a test can see the clean-up happen in the worker."""

    def slow(self) -> int:
        time.sleep(1.0)
        return 1

    def close(self) -> None:
        with open(os.environ["AV_TD3_TEST_CLOSED"], "w") as f:
            f.write("closed")


def test_a_worker_whose_trainer_dies_mid_call_cleans_up_on_the_broken_pipe(tmp_path, monkeypatch):
    """#35: the trainer is gone while the worker is inside a call; its answer meets a broken pipe, and the worker
    closes its env (gives the server back) as it does when the pipe ends while it waits."""
    marker = tmp_path / "closed"
    monkeypatch.setenv("AV_TD3_TEST_CLOSED", str(marker))
    worker = carla_worker.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=ClosingEnv)
    worker._conn.send(("slow", (), {}))
    worker._conn.close()  # the trainer dies mid-call
    worker._process.join(timeout=20.0)
    assert worker._process.exitcode == 0 and marker.read_text() == "closed"


def test_the_worker_ignores_stop_signals_sent_to_the_process_group(tmp_path):
    """#35: scancel and a cluster's preemption notice signal the whole process group. The trainer stand-in records
    them (as the trainer does); the worker lives on, answers, and is closed by the trainer afterwards."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import signal, sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from av_td3.envs.carla import worker as w\n"
        "from tests.test_env_carla import SlowEnv, carla_cfg\n"
        "got = []\n"
        "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):\n"
        "    signal.signal(s, lambda n, f: got.append(n))\n"
        "worker = w.ProcessWorker(carla_cfg(), 0, watchdog_s=30.0, factory=SlowEnv)\n"
        "pid = worker.call('pid')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(len(got), worker.call('pid') == pid, flush=True)\n"
        "worker.call('close')\n"
        "worker.kill()\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True, cwd=tmp_path)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        for stop in (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT):
            os.killpg(trainer.pid, stop)
            time.sleep(0.2)
        trainer.stdin.write("\n")
        trainer.stdin.flush()
        assert trainer.stdout.readline().split() == ["4", "True"]
        assert trainer.wait(timeout=30) == 0
    finally:
        trainer.kill()


def test_a_lost_server_is_not_waited_for_while_a_stop_is_pending():
    """#35: once the trainer has a stop signal pending, a lost server is not restarted (that would reload the town
    inside the stop's grace period): the env says so at once and the trainer stops."""
    env, fake, start, clock = worker_env(max_reconnects=0)
    env.reset(seed=0)
    fake.server.down = True
    env.stop_pending = lambda: True
    with pytest.raises(base.StopRequested, match="while the run is stopping"):
        env.step(np.zeros(2))
    assert clock.sleeps == [] and len(start.started) == 1
    env.close()


def test_real_client_in_a_worker_process_no_server_is_env_unavailable():
    pytest.importorskip("carla")
    port = _closed_port()
    with pytest.raises(EnvUnavailableError, match=rf"127.0.0.1:{port}.*docker compose"):
        CarlaDrivingEnv(carla_cfg(host="127.0.0.1", port=port, timeout_s=1.0), 0)


# ------------------------------------------------------------------------------------------ episode rules
def step_until_done(env, action, steps: int):
    for i in range(steps):
        _, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
        if terminated or truncated:
            return i + 1, terminated, truncated, info
    return steps, False, False, info


@pytest.mark.parametrize("key, off", [("route_deviation_m", None), ("wrong_way_deg", None)])
def test_route_deviation_and_wrong_way_terminate_with_their_reason(key, off):
    """Scripted: the car is put two lanes off its route (still on the road), or turned against it while moving."""
    for value in ("default", off):
        overrides = {"route.start_index": 0} if value == "default" else {"route.start_index": 0, key: off}
        env, fake, _ = make_env(**overrides)
        env.reset(seed=0)
        car = ego(fake)
        if key == "route_deviation_m":
            car.transform.location.y = LANES_Y[2]  # 7 m right of the route's lane: on the road, off the route
        else:
            car.transform.rotation.yaw, car.speed = 180.0, 3.0  # driving back along the route
        _, _, terminated, truncated, info = env.step(np.zeros(2))
        if value == "default":
            assert terminated and not truncated and info["termination"] == key.rsplit("_", 1)[0]
            assert not info["collision"] and not info["off_road"]
        else:
            assert not terminated and info["termination"] == ""
        env.close()


@pytest.mark.parametrize("lane_y, wrong_way_deg, reason", [(carla_double.ONCOMING_Y, 135.0, "wrong_way"),
                                                          (carla_double.ONCOMING_Y, None, None),
                                                          (LANES_Y[1], 135.0, None)])
def test_cruising_in_the_oncoming_lane_is_wrong_way(lane_y, wrong_way_deg, reason):
    """#35 item 9: a car cruising along the oncoming lane, pointing the route's way, is only one lane width (3.5 m)
    off the route: within env.carla.route_deviation_m (5 m) and not wrong-way by its heading, so it was never
    stopped. Its lane runs against the route (Roach's wrong-lane test): wrong_way. The same offset into the next
    lane of the route's own direction (a lane change) goes on."""
    env, fake, _ = make_env(wrong_way_deg=wrong_way_deg, **{"route.start_index": 1})  # x=20, y=0
    env.reset(seed=0)
    car = ego(fake)
    car.transform.location.y, car.speed = lane_y, 5.0  # pointing along the route (+x), in the other lane
    steps, terminated, truncated, info = step_until_done(env, [0.0, 0.2], 40)
    assert abs(info["reward_components"]["route_deviation"]) == 0.0  # 3.5 m: within route_deviation_m
    if reason:
        assert (steps, terminated, info["termination"]) == (1, True, reason)
    else:
        assert (steps, terminated, truncated) == (40, False, False) and not info["off_road"]
    env.close()


def test_blocked_terminates_after_blocked_s_of_standing_still():
    env, _, _ = make_env(blocked_s=1.0, fixed_delta_s=0.05, **{"route.start_index": 0})
    env.reset(seed=0)
    steps, terminated, truncated, info = step_until_done(env, [0.0, -1.0], 100)
    assert (steps, terminated, info["termination"]) == (20, True, "blocked")  # 20 ticks of 0.05 s
    env.close()
    env, _, _ = make_env(blocked_s=None, max_episode_steps=40, **{"route.start_index": 0})
    env.reset(seed=0)
    steps, terminated, truncated, info = step_until_done(env, [0.0, -1.0], 100)
    assert (steps, terminated, truncated) == (40, False, True)
    env.close()


@pytest.mark.parametrize("light, red_light, reason", [("Red", True, "red_light"), ("Green", True, None),
                                                      ("Red", False, None)])
def test_running_a_red_light_terminates(light, red_light, reason):
    """Scripted: the car drives through the light's trigger area into the junction at 10 m/s."""
    env, fake, _ = make_env(red_light=red_light, **{"route.start_index": 9})  # x=180, y=0: 20 m before it
    env.reset(seed=0)
    fake.server.light_state = getattr(carla_double.TrafficLightState, light)
    car = ego(fake)
    car.transform.location.x, car.speed = 195.0, 10.0
    fake.server.publish()
    reasons = []
    for _ in range(20):  # 20 ticks at 10 m/s: through the area, 10 m into the junction and beyond
        car.speed = 10.0
        _, _, terminated, _, info = env.step(np.zeros(2))
        reasons.append(info["termination"])
        if terminated:
            break
    assert (reasons[-1] or None) == reason
    if reason:
        assert car.transform.location.x >= 200.0 and reasons.count("red_light") == 1
    env.close()


def test_a_rule_broken_at_the_last_step_terminates_rather_than_truncates():
    env, fake, _ = make_env(max_episode_steps=1, **{"route.start_index": 0})
    env.reset(seed=0)
    ego(fake).transform.location.y = LANES_Y[2]
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert terminated and not truncated and info["termination"] == "route_deviation"
    env.close()


# ----------------------------------------------------------------------- each rule's own reward term
RULES = ("route_deviation", "wrong_way", "blocked", "red_light")


def break_rule(rule: str, **overrides):
    """Scripted: drive the double into breaking ``rule``; returns the env, the breaking step's reward and info."""
    start = 9 if rule == "red_light" else 0  # x=180, y=0: 20 m before the red light's junction
    env, fake, _ = make_env(blocked_s=1.0, **{"route.start_index": start}, **overrides)
    env.reset(seed=0)
    car = ego(fake)
    if rule == "route_deviation":
        car.transform.location.y = LANES_Y[2]  # two lanes off the route, still on the road
    elif rule == "wrong_way":
        car.transform.rotation.yaw, car.speed = 180.0, 3.0
    elif rule == "red_light":
        fake.server.light_state = carla_double.TrafficLightState.Red
        car.transform.location.x = 195.0
    fake.server.publish()
    action = [0.0, -1.0] if rule == "blocked" else [0.0, 0.0]
    for _ in range(40):
        if rule == "red_light":
            car.speed = 10.0
        _, reward, terminated, _, info = env.step(np.asarray(action, dtype=np.float32))
        if terminated:
            return env, reward, info
    raise AssertionError(f"{rule} was never broken")


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_has_its_own_reward_term_and_penalty_key(rule):
    """The breaking step costs env.reward.<rule>_penalty in its own term of info["reward_components"] (the other
    rules' terms read 0), and the key sets the price."""
    terms = {}
    for penalty in (10.0, 3.0):
        env, reward, info = break_rule(rule, **{f"reward.{rule}_penalty": penalty})
        assert info["termination"] == rule and not info["collision"] and not info["off_road"]
        components = info["reward_components"]
        assert components[rule] == -penalty
        assert all(components[other] == 0.0 for other in RULES if other != rule)
        assert reward == pytest.approx(sum(components.values()))
        terms[penalty] = reward
        env.close()
    assert terms[10.0] - terms[3.0] == pytest.approx(-7.0, abs=1e-6)  # only the rule's price differs


def test_collision_and_leaving_the_road_keep_their_own_penalties_and_reasons():
    """Collision and off-road are reasons of their own, priced by env.reward.collision_penalty / offroad_penalty
    in the safety term; no rule term fires with them."""
    env, fake, _ = make_env(**{"route.start_index": 0, "reward.collision_penalty": 7.0})
    env.reset(seed=0)
    fake.server.collide_at = {fake.server.frame + 1}
    _, _, terminated, _, info = env.step(np.zeros(2))
    assert terminated and info["termination"] == "collision"
    assert info["reward_components"]["safety"] == -7.0 and all(info["reward_components"][r] == 0.0 for r in RULES)
    env.close()


def test_a_rule_broken_while_the_server_is_lost_neither_terminates_nor_costs():
    """An interrupted step is truncated on the last good observation with every term 0 (the base class decides)."""
    env, fake, _ = make_env(**{"route.start_index": 0})
    obs, _ = env.reset(seed=0)
    ego(fake).transform.location.y = LANES_Y[2]
    fake.server.timeouts_on_tick = 1
    after, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (reward, terminated, truncated, info["termination"]) == (0.0, False, True, "")
    assert set(info["reward_components"].values()) == {0.0}
    np.testing.assert_array_equal(after["image"], obs["image"])
    env.close()


# ------------------------------------------------------------------------------- the traffic light ahead
LIGHT = slice(-2, None)  # the CARLA state tail: light distance (m), light colour


@pytest.mark.parametrize("state, colour", [("Red", 1.0), ("Yellow", 0.5), ("Green", 0.0), ("Off", 0.0)])
def test_state_ends_with_the_traffic_light_ahead(state, colour):
    """20 m before the junction's stop line the tail reads (20 m, the colour); env.carla.traffic_light=false
    reads "no light" in the same scene, and the state keeps its size."""
    readings = {}
    for on in (True, False):
        env, fake, _ = make_env(traffic_light=on, **{"route.start_index": 9})  # x=180, y=0
        env.reset(seed=0)
        fake.server.light_state = getattr(carla_double.TrafficLightState, state)
        _, observed, _ = env._observe(image_now(fake))
        assert observed.shape == (backends.CARLA.state_dim(env.cfg),)
        readings[on] = tuple(observed[LIGHT])
        env.close()
    assert readings[True] == pytest.approx((20.0, colour), abs=0.05)
    assert readings[False] == lights.NO_LIGHT


def test_no_light_beyond_range_or_once_past_the_stop_line():
    env, fake, _ = make_env(**{"route.start_index": 7})  # x=140: the stop line is 60 m ahead, beyond range
    env.reset(seed=0)
    fake.server.light_state = carla_double.TrafficLightState.Red
    _, observed, _ = env._observe(image_now(fake))
    assert tuple(observed[LIGHT]) == lights.NO_LIGHT
    car = ego(fake)
    for x, reading in ((155.0, (45.0, 1.0)), (199.0, (1.0, 1.0)), (201.0, lights.NO_LIGHT)):  # in range, past it
        car.transform.location.x = x
        fake.server.publish()
        _, observed, _ = env._observe(image_now(fake))
        assert tuple(observed[LIGHT]) == pytest.approx(reading, abs=0.05), x
    env.close()


def test_a_stop_line_of_another_lane_is_not_ahead():
    """The stop lines of the lanes beside the route's (3.5 m away) do not count; the map is read once per scene."""
    env, fake, _ = make_env(**{"route.start_index": 9})
    env.reset(seed=0)
    assert len(calls(fake, "get_stop_waypoints")) == 1
    assert len(env._lights._lines) == 1  # three stop lines on the map, one on the route's lane
    env.reset(seed=0)
    assert len(calls(fake, "get_stop_waypoints")) == 1  # lights are part of the map: not read again per episode
    env.close()


def test_the_wheel_has_what_the_light_lookup_calls():
    carla = pytest.importorskip("carla")
    assert callable(carla.TrafficLight.get_stop_waypoints) and callable(carla.TrafficLight.get_state)
    assert {"Red", "Yellow", "Green"} <= set(carla.TrafficLightState.names)
    assert "traffic.traffic_light" == FakeCarlaModule().server.traffic_light.type_id  # the filter's pattern matches


# ------------------------------------------------------------------- every client error, on every path (#35)
def another_client_reloads_the_map(fake: FakeCarlaModule) -> None:
    """Someone else loads a map on our server: our actors belong to an episode that is gone."""
    fake.Client("localhost", 2000).load_world("Town01")
    fake.server.publish()


def test_a_map_that_does_not_finish_loading_at_start_says_so():
    fake = FakeCarlaModule()
    fake.server.new_map_failures = 1
    with pytest.raises(EnvUnavailableError, match=r"localhost:2000 did not finish loading the map \(failed to "
                                                  r"connect to newly created map\).*load_world=false"):
        make_env(fake)
    assert claims_left() == []


def test_a_map_that_does_not_finish_loading_on_a_reconnect_is_retried():
    env, fake, sleeps = make_env()
    env.reset(seed=0)
    fake.server.timeouts_on_tick = 1
    fake.server.new_map_failures = 1  # the first reconnect's load_world fails, the second goes through
    _, _, terminated, truncated, info = env.step(np.zeros(2))
    assert truncated and not terminated and info["reconnects"] == 1 and sleeps == [1.0, 2.0]
    env.close()


def test_a_map_that_does_not_finish_loading_on_a_worker_restart_is_retried():
    env, fake, start, clock = worker_env(max_reconnects=0)  # straight to a fresh worker
    env.reset(seed=0)
    fake.server.restart()
    fake.server.new_map_failures = 1  # the fresh worker's take-over fails once: a cold server
    _, _, _, truncated, _ = env.step(np.zeros(2))
    # one fresh worker failed (not kept), one second later the next one stood
    assert truncated and len(start.started) == 2 and clock.sleeps == [1.0] and fake.server.new_map_failures == 0
    env.reset(seed=1)
    env.close()


@pytest.mark.parametrize("path", ["step", "reset"])
def test_an_actor_of_a_reloaded_map_is_a_lost_server_on_step_and_reset(path):
    """"trying to operate on a destroyed actor": another client reloaded the map under us. The session takes the
    server over again; a step ends as interrupted, a reset is replayed with the same draws."""
    reference, ref_fake, _ = make_env()
    reference.reset(seed=3)
    expected = traffic(ref_fake)
    reference.close()
    env, fake, sleeps = make_env()
    env.reset(seed=0)
    another_client_reloads_the_map(fake)
    if path == "step":
        _, _, terminated, truncated, info = env.step(np.zeros(2))
        assert truncated and not terminated and info["reconnects"] == 1 and info["interrupted"]
    else:
        _, info = env.reset(seed=3)
        assert info["reconnects"] == 1 and traffic(fake) == expected
    assert sleeps == [1.0]
    env.close()


def test_a_traffic_manager_port_in_use_at_start_names_the_key():
    fake = FakeCarlaModule()
    fake.server.host_ports_in_use = {8000}
    with pytest.raises(SimulatorUnusableError, match=r"Traffic Manager cannot listen on port 8000 "
                                                     r"\(env.carla.tm_port\).*bind error.*env.carla.tm_port=<a free"):
        make_env(fake)
    assert claims_left() == [] and fake.server.settings.synchronous_mode is False  # the server is given back


def test_a_traffic_manager_port_taken_while_the_worker_restarts_stops_with_the_fix():
    env, fake, _, _ = worker_env()
    env.reset(seed=0)
    fake.server.restart()
    fake.server.host_ports_in_use = {8000}  # another job took the port while our worker was gone
    with pytest.raises(SimulatorUnusableError, match=r"env.carla.tm_port"):
        env.step(np.zeros(2))
    env.close()


def test_an_ego_that_cannot_be_spawned_on_a_reconnect_stops_with_the_fix():
    env, fake, _ = make_env(**{"route.start_index": 0})
    env.reset(seed=0)
    fake.server.timeouts_on_tick = 1
    real_blocked = fake.server.blocked
    fake.server.blocked = lambda transform: True  # another client's cars stand on every spawn point now
    with pytest.raises(SimulatorUnusableError, match=r"the ego cannot be spawned at spawn point "
                                                     r"env.carla.route.start_index=0.*Stop the other client"):
        env.step(np.zeros(2))
    fake.server.blocked = real_blocked
    env.close()


def test_a_server_that_comes_back_without_the_town_stops_with_the_fix():
    env, fake, _, _ = worker_env()
    env.reset(seed=0)
    fake.server.restart()
    fake.server.maps = ["Town02"]
    with pytest.raises(SimulatorUnusableError,
                       match=r"localhost:2000 changed under the run: env.town='Town01' is not a map"):
        env.step(np.zeros(2))
    env.close()


def test_an_error_the_client_does_not_explain_is_raised_as_it_is():
    """A bug (here a Boost.Python argument error) is neither a lost server nor retried."""
    env, fake, sleeps = make_env()
    env.reset(seed=0)
    env._ego.apply_control = lambda control: (_ for _ in ()).throw(carla_double.ArgumentError("did not match"))
    with pytest.raises(carla_double.ArgumentError):
        env.step(np.zeros(2))
    assert sleeps == [] and len(fake.server.clients) == 1
    env.close()
