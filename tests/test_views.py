"""The embedded simulator's frames (``env.view``): the ego-centred, heading-up bird's-eye view shows the other
vehicles where they are, rotates with the ego, keeps the observation contract and obeys ``env.bev.*``; it is the
default, and ``world`` stays available (its frames are checked in tests/test_env_highway.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from av_td3.config import BevConfig, ConfigError, EnvConfig, ImageConfig
from av_td3.envs import HIGHWAY_ID, make
from av_td3.envs.base import observation_space
from av_td3.envs.highway import HighwayDrivingEnv
from av_td3.envs.views import EGO, MARKING, OFF_ROAD, ROAD, VEHICLE, BirdsEyeView, WorldView
from tests.test_config import load

# Seed 0 starts the ego on the racetrack's first straight (lane a-b, heading 0, 58 m long) in its right lane
# ("a", "b", 1), 28 m in; the left lane ("a", "b", 0) is 5 m to the driver's left.
LEFT_LANE = ("a", "b", 0)


def bev_env(npcs: int = 1, **bev: float) -> HighwayDrivingEnv:
    cfg = EnvConfig(town="racetrack", npcs=npcs, view="bev", bev=BevConfig(**bev),
                    image=ImageConfig(height=64, width=64, stack=1))
    env = HighwayDrivingEnv(cfg, seed=0)
    env.reset(seed=0)
    return env


def frame(env: HighwayDrivingEnv) -> np.ndarray:
    return env.view.render(env.sim.road, env.sim.vehicle)


def place(env: HighwayDrivingEnv, vehicle, ahead_m: float, lane_index=None) -> None:
    """Put ``vehicle`` on the centre of a lane (the ego's by default), ``ahead_m`` along it from the ego."""
    ego = env.sim.vehicle
    lane = env.sim.road.network.get_lane(lane_index) if lane_index else ego.lane
    s = lane.local_coordinates(ego.position)[0] + ahead_m
    vehicle.position, vehicle.heading = lane.position(s, 0), lane.heading_at(s)


def test_view_selects_the_renderer_and_bev_is_the_default() -> None:
    assert EnvConfig().view == "bev" and load().env.view == "bev"
    assert isinstance(make(replace(EnvConfig(), npcs=0)).view, BirdsEyeView)
    assert isinstance(make(replace(EnvConfig(), npcs=0, view="world")).view, WorldView)
    env = bev_env()
    assert isinstance(env.view, BirdsEyeView)
    world = make(replace(env.cfg, view="world"), seed=0)
    assert not np.array_equal(world.reset(seed=0)[0]["image"], env.reset(seed=0)[0]["image"])


def test_a_vehicle_ahead_appears_where_it_is_and_disappears_when_removed() -> None:
    env = bev_env(npcs=1)
    ego, view = env.sim.vehicle, env.view
    npc = next(v for v in env.sim.road.vehicles if v is not ego)
    place(env, npc, 20.0)
    f = frame(env)
    row, col = view.pixel(20.0, 0.0)
    assert f[row, col] == VEHICLE
    rows, cols = np.nonzero(f == VEHICLE)
    # a 5 m x 2 m car at 1 m x 0.5 m pixels: ~5 rows x 4 columns around its centre, nothing anywhere else
    assert 5 <= np.ptp(rows) + 1 <= 6 and 4 <= np.ptp(cols) + 1 <= 5
    assert abs(rows.mean() - (row + 0.5)) <= 1 and abs(cols.mean() - (col + 0.5)) <= 1
    assert view.pixel(20.0, 0.0)[0] < view.pixel(0.0, 0.0)[0]  # ahead is up in the frame
    assert f[view.pixel(0.0, 0.0)] == EGO
    # in the lane to the driver's left: left of the ego in the frame, at the same distance ahead
    place(env, npc, 20.0, LEFT_LANE)
    f = frame(env)
    assert f[view.pixel(20.0, 5.0)] == VEHICLE and f[row, col] != VEHICLE
    assert view.pixel(20.0, 5.0)[1] < view.pixel(0.0, 0.0)[1]
    env.sim.road.vehicles.remove(npc)
    f = frame(env)
    assert not (f == VEHICLE).any()
    assert f[view.pixel(20.0, 5.0)] in (ROAD, MARKING)


def test_vehicles_beyond_the_frame_are_not_drawn_and_the_levels_are_distinct() -> None:
    env = bev_env(npcs=1)
    npc = next(v for v in env.sim.road.vehicles if v is not env.sim.vehicle)
    place(env, npc, 48.0 + 3.0)  # its rear bumper 0.5 m beyond the top edge
    assert not (frame(env) == VEHICLE).any()
    place(env, npc, 48.0 + 2.0)  # its rear half metre inside the top row
    f = frame(env)
    assert (f[0] == VEHICLE).any() and not (f[1:] == VEHICLE).any()
    assert set(np.unique(f)) == {OFF_ROAD, ROAD, MARKING, EGO, VEHICLE}
    assert len({OFF_ROAD, ROAD, MARKING, EGO, VEHICLE}) == 5 and min(EGO, VEHICLE) - max(ROAD, MARKING) >= 50


def _road_span(f: np.ndarray, row: int, col: int) -> tuple[int, int]:
    """First and last column of the stretch of road (or markings) in ``row`` that holds column ``col``."""
    off = np.flatnonzero(f[row] == OFF_ROAD)
    assert f[row, col] != OFF_ROAD
    left, right = off[off < col], off[off > col]
    return (int(left.max()) + 1 if left.size else 0), (int(right.min()) - 1 if right.size else f.shape[1] - 1)


@pytest.mark.parametrize("segment, s", [(("c", "d", 1), 5.0), (("f", "g", 1), 14.0), (("a", "b", 1), 10.0)])
def test_the_road_stays_up_whatever_the_ego_heading(segment, s: float) -> None:
    """On straight segments heading right, up and diagonally in the world, driving along the lane centre, the
    road crosses the frame's rows at the same columns: the frame turns with the ego."""
    env = bev_env(npcs=0)
    ego, view = env.sim.vehicle, env.view
    row, col = view.pixel(3.5, 0.0)
    reference = _road_span(frame(env), row, col)
    lane = env.sim.road.network.get_lane(segment)
    ego.position, ego.heading = lane.position(s, 0), lane.heading_at(s)
    f = frame(env)
    for ahead in (3.5, -3.5):
        first, last = _road_span(f, view.pixel(ahead, 0.0)[0], col)
        assert abs(first - reference[0]) <= 1 and abs(last - reference[1]) <= 1
    # the two lanes (10 m) and their edge markings: ~20-22 columns at 0.5 m, left of the ego's lane mostly
    assert 19 <= reference[1] - reference[0] + 1 <= 23


def test_turning_the_ego_turns_the_road_in_the_frame() -> None:
    env = bev_env(npcs=0)
    ego, view = env.sim.vehicle, env.view
    row_near, row_far = view.pixel(3.5, 0.0)[0], view.pixel(9.0, 0.0)[0]
    f = frame(env)
    assert (f[row_near, 16:48] == OFF_ROAD).sum() > 8  # heading along the road: a row crosses it
    ego.heading -= math.pi / 2  # now facing the left lane, across the road (highway-env turns clockwise)
    f = frame(env)
    assert (f[row_near] != OFF_ROAD).all()  # 3.5 m ahead: the left lane, running across the whole frame
    assert (f[row_far] == OFF_ROAD).all()  # 9 m ahead: beyond the road's left edge


def test_observation_contract_and_env_checker() -> None:
    env = make(EnvConfig(town="racetrack", npcs=3, view="bev", image=ImageConfig(height=48, width=40, stack=3)))
    assert env.observation_space == observation_space(3, 48, 40, env.cfg.lane_points)
    obs, _ = env.reset(seed=1)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (3, 48, 40)
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 0.5], dtype=np.float32))
        assert env.observation_space.contains(obs)
    assert not np.array_equal(obs["image"][0], obs["image"][-1])  # the stack holds different moments
    check_env(env, skip_render_check=True)
    env.close()
    # through gymnasium's registry, the bev geometry given as a dict
    env = gym.make(HIGHWAY_ID, town="racetrack", npcs=0, view="bev", bev={"ahead_m": 30.0},
                   image={"height": 32, "width": 32, "stack": 2})
    assert env.unwrapped.cfg.bev == BevConfig(ahead_m=30.0) and isinstance(env.unwrapped.view, BirdsEyeView)
    assert env.reset(seed=0)[0]["image"].shape == (2, 32, 32)
    env.close()


def test_the_road_canvas_follows_the_ego_and_matches_a_fresh_drawing() -> None:
    """The road is drawn once onto a canvas and redrawn only when the ego moves far: a frame read from an old
    canvas equals one drawn afresh, over a drive long enough to redraw several times."""
    env = bev_env(npcs=2)
    redraws, centre = 0, env.view._centre.copy()
    for _ in range(60):
        env.step(np.array([0.0, 0.6], dtype=np.float32))
        if not np.array_equal(env.view._centre, centre):
            redraws, centre = redraws + 1, env.view._centre.copy()
        fresh = BirdsEyeView(64, 64, env.cfg.bev)
        assert np.array_equal(fresh.render(env.sim.road, env.sim.vehicle), frame(env))
    assert redraws >= 1


def test_bev_keys_set_the_geometry() -> None:
    default = bev_env(npcs=0)
    f0 = frame(default)
    rows0, cols0 = np.nonzero(f0 == EGO)
    assert 46 <= rows0.mean() <= 49  # a quarter from the bottom at ahead 48 / behind 16
    behind = bev_env(npcs=0, behind_m=48.0)  # 96 m tall: the ego mid-frame and half as long
    rows, _ = np.nonzero(frame(behind) == EGO)
    assert 30 <= rows.mean() <= 33 and np.ptp(rows) < np.ptp(rows0)
    ahead = bev_env(npcs=0, ahead_m=16.0)  # 32 m tall: the ego half-way up, twice as long
    rows, _ = np.nonzero(frame(ahead) == EGO)
    assert 30 <= rows.mean() <= 33 and np.ptp(rows) > np.ptp(rows0)
    side = bev_env(npcs=0, side_m=8.0)  # 16 m wide: the ego twice as wide
    _, cols = np.nonzero(frame(side) == EGO)
    assert np.ptp(cols) + 1 >= 2 * (np.ptp(cols0) + 1) - 1


def test_bad_view_values_are_config_errors() -> None:
    assert load("env.view=bev", "env.bev.ahead_m=30").env.bev.ahead_m == 30.0
    for override, key in (("env.view=top", "env.view"), ("env.bev.side_m=0", "env.bev.side_m"),
                          ("env.bev.ahead_m=-1", "env.bev.ahead_m"), ("env.bev.behind_m=1000", "env.bev.behind_m")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load(override)
    assert load("env=carla").env.view == "bev"  # the embedded simulator's default: CARLA ignores it


def test_carla_warns_that_it_ignores_a_changed_view(caplog: pytest.LogCaptureFixture) -> None:
    from av_td3.envs import backends

    with caplog.at_level(logging.WARNING):
        assert backends.warn_ignored(load("env=carla", "env.view=world").env) == ["env.view"]
    assert "env.view" in caplog.text and "ignored by env.name=carla" in caplog.text
