"""The backend-neutral half of the env contract: the lead-vehicle measurement both backends put in the state."""

from __future__ import annotations

import numpy as np
import pytest

from av_td3.envs.base import LEAD_RANGE_M, lead_vehicle

STRAIGHT = np.stack([np.arange(0.0, 52.0, 2.0), np.zeros(26)], axis=1)  # along +x from the ego at the origin
NOTHING = (LEAD_RANGE_M, 0.0)


def lead(others_xy, others_v=None, path=STRAIGHT, half_width=2.0, ego_speed=10.0):
    others_xy = np.asarray(others_xy, dtype=float).reshape(-1, 2)
    v = np.zeros_like(others_xy) if others_v is None else np.asarray(others_v, dtype=float).reshape(-1, 2)
    return lead_vehicle(path, half_width, ego_speed, others_xy, v)


def test_the_nearest_vehicle_ahead_in_the_lane_counts():
    gap, closing = lead([[30.0, 0.5], [12.0, -1.0], [20.0, 0.0]], [[0, 0], [7.0, 3.0], [0, 0]])
    assert gap == pytest.approx(12.0) and closing == pytest.approx(10.0 - 7.0)  # only the along-lane part


@pytest.mark.parametrize("where", [[[-3.0, 0.0]], [[10.0, 2.5]], [[10.0, -2.5]], [[60.0, 0.0]], np.zeros((0, 2))],
                         ids=["behind", "left lane", "right lane", "beyond the path", "no vehicles"])
def test_vehicles_out_of_the_lane_ahead_do_not(where):
    assert lead(where) == NOTHING


def test_a_slower_car_is_closing_a_faster_one_is_not():
    assert lead([[10.0, 0.0]], [[4.0, 0.0]])[1] == pytest.approx(6.0)
    assert lead([[10.0, 0.0]], [[14.0, 0.0]])[1] == pytest.approx(-4.0)


def test_gap_is_measured_along_a_bending_lane():
    """A quarter circle of radius 20 m turning left: a car on it 10 m from its end is 31.4 - 10 m along."""
    phi = np.linspace(0.0, np.pi / 2, 200)
    arc = np.stack([20.0 * np.sin(phi), 20.0 - 20.0 * np.cos(phi)], axis=1)
    at = np.pi / 2 - 0.5  # 0.5 rad (10 m) before the end, where the lane heads at angle `at`
    car = [20.0 * np.sin(at), 20.0 - 20.0 * np.cos(at)]
    gap, closing = lead([car], [[0.0, -5.0]], path=arc)  # moving in -y: against the lane there
    assert gap == pytest.approx(20.0 * np.pi / 2 - 10.0, abs=0.01)
    assert closing == pytest.approx(10.0 + 5.0 * np.sin(at), abs=0.01)  # -(0, -5) . (cos at, sin at)
    assert lead([car], path=arc[:100]) == NOTHING  # past the shorter path's end

