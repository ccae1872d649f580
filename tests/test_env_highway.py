"""The embedded simulator (highway-env) keeps the env contract, draws the scene, and obeys every env key."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from highway_env.vehicle.kinematics import Vehicle

from av_td3.config import ConfigError, EnvConfig, ImageConfig
from av_td3.envs import HIGHWAY_ID, make, make_vector
from av_td3.envs.base import (HEADING, INFO_KEYS, LATERAL, LEAD_CLOSING, LEAD_GAP, LEAD_RANGE_M, REWARD_COMPONENTS,
                              action_space, lane_point_slice, observation_space, state_dim)

ROOT = Path(__file__).resolve().parent.parent
IDLE = np.zeros(2, dtype=np.float32)
# Seed 0 starts the ego on the racetrack's first straight, in the right lane, 28 m into its 58 m, at 10 m/s.


def check_info(info: dict) -> None:
    assert set(info) == {*INFO_KEYS, "reward_components", "termination"}
    assert tuple(info["reward_components"]) == REWARD_COMPONENTS
    assert all(type(v) is float for v in info["reward_components"].values())


@pytest.mark.parametrize("via", ["make", "gymnasium.make"])
def test_contract(smoke_env_cfg: EnvConfig, via: str) -> None:
    c = smoke_env_cfg
    if via == "make":
        env = make(c)
    else:
        env = gym.make(HIGHWAY_ID, town=c.town, npcs=c.npcs, image=asdict(c.image), reward={"efficiency": 2.0})
        assert env.unwrapped.cfg.reward.efficiency == 2.0  # nested keys given as dicts
    assert env.observation_space == observation_space(c.image.stack, c.image.height, c.image.width, c.lane_points)
    assert env.action_space == action_space()
    obs, info = env.reset(seed=0)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (2, 32, 32)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (state_dim(c.lane_points),)
    assert env.observation_space.contains(obs)
    check_info(info)
    for action in ([0.0, 0.5], [0.2, -0.1], [-1.0, 1.0]):
        obs, reward, terminated, truncated, info = env.step(np.array(action, dtype=np.float32))
        assert env.observation_space.contains(obs)
        assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
        check_info(info)
        assert reward == pytest.approx(sum(info["reward_components"].values()))
    env.close()


def test_frames_show_the_road_and_change_as_the_car_moves(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, image=ImageConfig(height=64, width=64, stack=1)))
    obs, _ = env.reset(seed=0)
    first = obs["image"][-1]
    levels, counts = np.unique(first, return_counts=True)
    ground = levels[counts.argmax()]
    assert len(levels) >= 3  # ground, lane markings, cars
    assert first.max() >= ground + 100  # bright markings on darker ground
    assert (first[28:36, 28:36] != ground).any()  # the ego car, drawn at the centre
    for _ in range(3):
        obs, *_ = env.step(IDLE)
    assert not np.array_equal(obs["image"][-1], first)


def test_frames_are_drawn_even_with_the_dummy_video_driver_preset() -> None:
    """highway-env draws nothing under SDL_VIDEODRIVER=dummy; importing our backend switches it to offscreen, for
    our frames and for highway-env's own viewer. Also: importing av_td3.envs loads neither backend."""
    code = """
import os, sys
import numpy as np
from av_td3.config import EnvConfig, ImageConfig
from av_td3.envs import make
assert "av_td3.envs.carla" not in sys.modules and "av_td3.envs.highway" not in sys.modules
env = make(EnvConfig(npcs=1, image=ImageConfig(32, 32, 1), view="world"))  # the view highway-env draws
obs, _ = env.reset(seed=0)
from highway_env.envs.common.graphics import EnvViewer
viewer = EnvViewer(env.sim)
viewer.display()
print(os.environ["SDL_VIDEODRIVER"], np.ptp(obs["image"]), np.ptp(viewer.get_image()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    driver, ours, viewer = proc.stdout.split()
    assert driver == "offscreen" and int(ours) > 0 and int(viewer) > 0


# ----------------------------------------------------------------------------------------------- env keys
def test_town_selects_the_scene(smoke_env_cfg: EnvConfig) -> None:
    track, road = make(smoke_env_cfg), make(replace(smoke_env_cfg, town="highway"))
    assert len(track.sim.road.network.graph) == 9  # the racetrack's nine segments, a closed loop
    assert [len(lanes) for lanes in road.sim.road.network.graph["0"].values()] == [3]  # one three-lane road
    assert track.reset(seed=0)[0]["state"][0] == 10.0 and road.reset(seed=0)[0]["state"][0] == 25.0
    with pytest.raises(ConfigError, match=r"env\.town='moon'.*racetrack, highway"):
        make(replace(smoke_env_cfg, town="moon"))


@pytest.mark.parametrize("town", ["racetrack", "highway"])
@pytest.mark.parametrize("npcs", [0, 7, 30])
def test_npcs_sets_the_number_of_other_vehicles(smoke_env_cfg: EnvConfig, town: str, npcs: int) -> None:
    env = make(replace(smoke_env_cfg, town=town, npcs=npcs))
    for seed in (0, 1):
        env.reset(seed=seed)
        assert len(env.sim.road.vehicles) == npcs + 1


def test_racetrack_refuses_more_npcs_than_it_holds(smoke_env_cfg: EnvConfig) -> None:
    with pytest.raises(ConfigError, match=r"env\.npcs=31.*env\.npcs <= 30"):
        make(replace(smoke_env_cfg, npcs=31))


def test_image_keys_set_the_frames(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, image=ImageConfig(height=24, width=40, stack=3)))
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == env.observation_space["image"].shape == (3, 24, 40)
    obs, *_ = env.step(IDLE)
    frames = obs["image"]  # oldest first: the first frame twice, then the new one
    assert np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])


def test_max_episode_steps_truncates_at_exactly_that_step(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, npcs=0, max_episode_steps=3))
    env.reset(seed=0)
    assert [env.step(IDLE)[2:4] for _ in range(3)] == [(False, False), (False, False), (False, True)]


def rollout(cfg: EnvConfig, steps: int = 4) -> list[tuple[float, dict]]:
    """(reward, reward components) of each step of one seeded drive."""
    env = make(cfg)
    env.reset(seed=0)
    out = []
    for _ in range(steps):
        _, reward, _, _, info = env.step(np.array([0.2, 0.5], dtype=np.float32))
        out.append((reward, info["reward_components"]))
    return out


def test_reward_weights_scale_their_components(smoke_env_cfg: EnvConfig) -> None:
    c = smoke_env_cfg
    base = rollout(c)
    doubled = rollout(replace(c, reward=replace(c.reward, efficiency=2.0)))
    muted = rollout(replace(c, reward=replace(c.reward, lane_keeping=0.0)))
    assert all(parts["efficiency"] > 0 and parts["lane_keeping"] < 0 for _, parts in base)
    for (r1, p1), (r2, p2), (_, p3) in zip(base, doubled, muted):
        assert p2["efficiency"] == pytest.approx(2 * p1["efficiency"])
        assert r2 - r1 == pytest.approx(p1["efficiency"])
        assert p3["lane_keeping"] == 0.0


def test_lane_points_set_the_state(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, lane_points=3, lane_point_spacing=2.0))
    obs, _ = env.reset(seed=0)  # on the lane centre, aligned with the straight lane
    assert obs["state"].shape == env.observation_space["state"].shape == (state_dim(3),)
    np.testing.assert_allclose(obs["state"][lane_point_slice(3)].reshape(3, 2), [[2, 0], [4, 0], [6, 0]], atol=1e-4)


def test_lane_points_follow_the_road_into_the_next_segment(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, lane_points=8, lane_point_spacing=4.0))
    obs, _ = env.reset(seed=1)  # 9.5 m before the straight ends in a left-hand bend
    points = obs["state"][lane_point_slice(8)].reshape(8, 2)
    np.testing.assert_allclose(points[:2], [[4, 0], [8, 0]], atol=1e-4)
    assert (points[3:, 1] > 0).all() and (np.diff(points[2:, 1]) > 0).all()  # the bend goes left (y > 0)
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    assert ((gaps > 3.8) & (gaps < 4.0 + 1e-4)).all()  # 4 m apart along the lane (chords in the bend)


def test_state_holds_the_lead_vehicle_in_the_ego_lane(smoke_env_cfg: EnvConfig) -> None:
    """Gap (along the lane, centre to centre) and closing speed to the nearest car ahead in the ego's lane; cars in
    the other lane or behind do not count, and a car round the bend is measured along the lane."""
    env = make(replace(smoke_env_cfg, npcs=0))
    obs, _ = env.reset(seed=0)  # 28 m into a 58 m straight, 10 m/s, nobody about
    assert (obs["state"][LEAD_GAP], obs["state"][LEAD_CLOSING]) == (LEAD_RANGE_M, 0.0)
    ego, road = env.sim.vehicle, env.sim.road
    s, _ = ego.lane.local_coordinates(ego.position)
    other_lane = road.network.side_lanes(ego.lane_index)[0]
    road.vehicles += [Vehicle.make_on_lane(road, ego.lane_index, s + 20.0, speed=4.0),
                      Vehicle.make_on_lane(road, other_lane, s + 8.0, speed=0.0),
                      Vehicle.make_on_lane(road, ego.lane_index, s - 8.0, speed=0.0)]
    state = env._observe()[1]
    assert state[LEAD_GAP] == pytest.approx(20.0, abs=1e-3)
    assert state[LEAD_CLOSING] == pytest.approx(ego.speed - 4.0, abs=1e-3)

    env.reset(seed=1)  # 9.5 m before the straight ends in a left-hand bend
    ego, road = env.sim.vehicle, env.sim.road
    bend = road.network.next_lane(ego.lane_index, position=ego.lane.position(ego.lane.length, 0))
    road.vehicles.append(Vehicle.make_on_lane(road, bend, 10.0, speed=0.0))
    state = env._observe()[1]
    assert state[LEAD_GAP] == pytest.approx(19.5, abs=0.1)  # the path's chords fall a little short of the arc
    assert state[LEAD_CLOSING] == pytest.approx(ego.speed, rel=0.05)


def test_lead_vehicle_false_reads_nobody_ahead(smoke_env_cfg: EnvConfig) -> None:
    """env.lead_vehicle=false: the same car 20 m ahead leaves the lead entries at "nobody ahead"; the rest of the
    state is unchanged."""
    states = []
    for lead_vehicle in (True, False):
        env = make(replace(smoke_env_cfg, npcs=0, lead_vehicle=lead_vehicle))
        env.reset(seed=0)
        ego, road = env.sim.vehicle, env.sim.road
        s, _ = ego.lane.local_coordinates(ego.position)
        road.vehicles.append(Vehicle.make_on_lane(road, ego.lane_index, s + 20.0, speed=4.0))
        states.append(env._observe()[1])
    on, off = states
    assert on[LEAD_GAP] == pytest.approx(20.0, abs=1e-3) and on[LEAD_CLOSING] > 0
    assert (off[LEAD_GAP], off[LEAD_CLOSING]) == (LEAD_RANGE_M, 0.0)
    keep = np.ones(len(on), dtype=bool)
    keep[[LEAD_GAP, LEAD_CLOSING]] = False
    np.testing.assert_array_equal(on[keep], off[keep])


@pytest.mark.parametrize("sim_hz, policy_hz", [(15, 5), (20, 10)])
def test_frequencies_set_the_simulated_time_per_step(smoke_env_cfg: EnvConfig, sim_hz: int, policy_hz: int) -> None:
    env = make(replace(smoke_env_cfg, npcs=0, simulation_frequency=sim_hz, policy_frequency=policy_hz))
    env.reset(seed=0)
    info = env.step(IDLE)[4]
    assert env.sim.steps == sim_hz // policy_hz  # highway-env physics steps per decision
    assert info["progress"] == pytest.approx(10.0 / policy_hz, rel=1e-6)  # 10 m/s for one decision
    with pytest.raises(ConfigError, match="env.policy_frequency"):
        make(replace(smoke_env_cfg, simulation_frequency=5, policy_frequency=10))


def test_carla_only_keys_warn(smoke_env_cfg: EnvConfig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        make(replace(smoke_env_cfg, carla=replace(smoke_env_cfg.carla, port=2001)))
    assert "env.carla.port: settings of another backend, ignored by env.name=highway" in caplog.text


def test_unknown_backend_is_a_config_error(smoke_env_cfg: EnvConfig) -> None:
    with pytest.raises(ConfigError, match=r"env\.name='bogus'"):
        make(replace(smoke_env_cfg, name="bogus"))


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("steer, side", [(0.3, 1.0), (-0.3, -1.0)])
def test_steering_left_puts_the_car_left_of_the_lane_centre(smoke_env_cfg: EnvConfig, steer: float,
                                                            side: float) -> None:
    env = make(replace(smoke_env_cfg, npcs=0))
    env.reset(seed=0)
    for _ in range(3):
        obs, _, terminated, _, info = env.step(np.array([steer, 0.0], dtype=np.float32))
    state = obs["state"]
    assert not terminated
    assert side * state[LATERAL] > 1.0 and side * state[HEADING] > 0.2
    assert side * state[lane_point_slice(5)][-1] < -1.0  # the lane ahead is now on the other side (ego frame y)


def test_changing_lanes_is_a_lane_invasion(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, npcs=0))
    env.reset(seed=0)  # right lane: steering left crosses the dashed line into the left lane
    invasions = []
    for _ in range(6):
        _, _, terminated, _, info = env.step(np.array([0.3, 0.0], dtype=np.float32))
        invasions.append(info["lane_invasion"])
        assert not terminated
    assert sum(invasions) == 1 and not invasions[0]


def test_driving_straight_leaves_the_track_and_terminates(smoke_env_cfg: EnvConfig) -> None:
    env = make(replace(smoke_env_cfg, npcs=0))
    env.reset(seed=0)
    for _ in range(60):
        _, _, terminated, truncated, info = env.step(IDLE)
        if terminated:
            break
    assert terminated and info["off_road"] and not info["collision"] and not truncated
    assert info["reward_components"]["safety"] <= -smoke_env_cfg.reward.offroad_penalty


@pytest.mark.parametrize("town", ["racetrack", "highway"])
def test_hitting_a_car_is_a_collision_and_terminates(smoke_env_cfg: EnvConfig, town: str) -> None:
    env = make(replace(smoke_env_cfg, town=town, npcs=0))
    env.reset(seed=0)
    ego, road = env.sim.vehicle, env.sim.road
    s, _ = ego.lane.local_coordinates(ego.position)
    road.vehicles.append(Vehicle.make_on_lane(road, ego.lane_index, s + 12.0, speed=0.0))  # parked 12 m ahead
    for _ in range(10):
        _, _, terminated, _, info = env.step(np.array([0.0, 1.0], dtype=np.float32))
        if terminated:
            break
    assert terminated and info["collision"]
    assert info["reward_components"]["safety"] <= -smoke_env_cfg.reward.collision_penalty


# -------------------------------------------------------------------------------------------------- seeds
def test_reset_seed_reproduces_the_episode(smoke_env_cfg: EnvConfig) -> None:
    actions = [np.array([0.1 * k, 0.5], dtype=np.float32) for k in range(4)]

    def episode(env, seed: int | None) -> list[dict]:
        obs = [env.reset(seed=seed)[0]]
        return obs + [env.step(a)[0] for a in actions]

    env = make(smoke_env_cfg)
    runs = [episode(env, 7), episode(env, 7), episode(make(smoke_env_cfg), 7)]
    for a, b, c in zip(*runs):
        for key in ("image", "state"):
            assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], c[key])
    assert not np.array_equal(episode(env, 8)[0]["image"], runs[0][0]["image"])
    # a seed given to make() makes the unseeded resets that follow reproducible too
    one, two = make(smoke_env_cfg, seed=3), make(smoke_env_cfg, seed=3)
    for _ in range(2):
        assert np.array_equal(episode(one, None)[-1]["image"], episode(two, None)[-1]["image"])


# --------------------------------------------------------------------------------------------- vector env
def test_make_vector_batches_and_leaves_resets_to_the_caller(smoke_env_cfg: EnvConfig) -> None:
    cfg = replace(smoke_env_cfg, max_episode_steps=2)
    single = make_vector(cfg, 1)
    assert isinstance(single, gym.vector.SyncVectorEnv)
    single.close()
    envs = make_vector(cfg, 2)
    try:
        assert isinstance(envs, gym.vector.AsyncVectorEnv)
        obs, _ = envs.reset(seed=0)  # sub-envs get seeds 0 and 1
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (2, 2, 32, 32)
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (2, state_dim(cfg.lane_points))
        assert not np.array_equal(obs["image"][0], obs["image"][1])
        for _ in range(2):
            obs, reward, terminated, truncated, info = envs.step(np.zeros((2, 2), dtype=np.float32))
        assert reward.shape == (2,) and truncated.all() and not terminated.any()
        assert set(INFO_KEYS) <= set(info) and info["reward_components"]["progress"].shape == (2,)
        final = obs  # no autoreset: these are the ended episodes' last observations
        obs, _ = envs.reset(seed=[5, None], options={"reset_mask": np.array([True, False])})
        assert not np.array_equal(obs["image"][0], final["image"][0])
        assert np.array_equal(obs["image"][1], final["image"][1])  # left alone
    finally:
        envs.close()


@pytest.mark.parametrize("town", ["racetrack", "highway"])
def test_vectorised_road_queries_answer_as_highway_env_does(smoke_env_cfg: EnvConfig, town: str) -> None:
    from highway_env.road.road import Road, RoadNetwork
    from highway_env.vehicle.kinematics import Vehicle

    from av_td3.envs.fast_road import BatchedRoadStep, FastLaneLookup, FastNeighbours

    env = make(replace(smoke_env_cfg, town=town, npcs=20))
    env.reset(seed=3)
    road = env.unwrapped.sim.road
    assert isinstance(road.network.get_closest_lane_index, FastLaneLookup)  # installed on the scene's road
    assert isinstance(road.neighbour_vehicles, FastNeighbours)
    assert isinstance(road.step, BatchedRoadStep)
    rng = np.random.default_rng(0)
    lanes = road.network.lanes_list()
    lane_indexes = [(f, t, i) for f, d in road.network.graph.items() for t, ls in d.items() for i in range(len(ls))]
    for step in range(8):
        env.step(rng.uniform(-0.3, 1, size=2).astype(np.float32))
        # points on, beside and far off every lane, with random headings, and every vehicle's own position
        for lane in lanes:
            for s, r in ((0.3 * lane.length, 0.0), (rng.uniform(-10, lane.length + 10), rng.uniform(-12, 12))):
                p, h = lane.position(s, r), rng.uniform(-np.pi, np.pi)
                for heading in (h, None):
                    assert (road.network.get_closest_lane_index(p, heading)
                            == RoadNetwork.get_closest_lane_index(road.network, p, heading))
        for v in road.vehicles:
            # the batched lookup after the sub-step gave each vehicle the lane highway-env's own lookup gives
            assert v.lane_index == RoadNetwork.get_closest_lane_index(road.network, v.position, v.heading)
            assert v.lane is road.network.get_lane(v.lane_index)
            assert (road.network.get_closest_lane_index(v.position, v.heading)
                    == RoadNetwork.get_closest_lane_index(road.network, v.position, v.heading))
            for lane_index in (None, *lane_indexes[:: 3]):
                assert road.neighbour_vehicles(v, lane_index) == Road.neighbour_vehicles(road, v, lane_index)
        # a vehicle that is not on the road's list (highway-env asks about such ones too)
        probe = Vehicle(road, lanes[step % len(lanes)].position(rng.uniform(0, 20), 0.0))
        for lane_index in lane_indexes:
            assert road.neighbour_vehicles(probe, lane_index) == Road.neighbour_vehicles(road, probe, lane_index)


def test_vectorised_road_replays_highway_envs_own_episode(smoke_env_cfg: EnvConfig) -> None:
    from av_td3.envs.highway import HighwayDrivingEnv

    cfg = replace(smoke_env_cfg, npcs=20, max_episode_steps=80)
    fast, stock = HighwayDrivingEnv(cfg), HighwayDrivingEnv(cfg, vectorised_road=False)
    assert "neighbour_vehicles" not in vars(stock.sim.road)  # highway-env's own method
    rng = np.random.default_rng(1)
    (a, _), (b, _) = fast.reset(seed=5), stock.reset(seed=5)
    for _ in range(60):
        action = rng.uniform(-0.2, 0.8, size=2).astype(np.float32)
        a, ra, ta, _, _ = fast.step(action)
        b, rb, tb, _, _ = stock.step(action)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_allclose(a["state"], b["state"], rtol=0, atol=1e-6)
        assert ra == pytest.approx(rb, abs=1e-9) and ta == tb
        if ta:
            break
    fast_npcs = [v.position for v in fast.sim.road.vehicles]
    stock_npcs = [v.position for v in stock.sim.road.vehicles]
    np.testing.assert_allclose(fast_npcs, stock_npcs, rtol=0, atol=1e-9)
    assert [v.lane_index for v in fast.sim.road.vehicles] == [v.lane_index for v in stock.sim.road.vehicles]
    assert [v.crashed for v in fast.sim.road.vehicles] == [v.crashed for v in stock.sim.road.vehicles]
