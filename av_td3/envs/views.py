"""The embedded simulator's camera: how one grayscale frame uint8[H, W] is drawn from highway-env's road (``env.view``).

* ``world`` (:class:`WorldView`): highway-env's own graphics, an axis-aligned top view :data:`VIEW_METRES` wide
  centred on the ego car. In gray: ground 101, lane markings 255, the ego car 133 (green), other cars 177
  (blue), car outlines 61. The world never rotates, so the road's direction in the frame changes as the car turns.
* ``bev`` (:class:`BirdsEyeView`): an ego-centred, heading-up bird's-eye view: the ego car's heading points up,
  its left is the frame's left, and the frame shows ``env.bev.ahead_m`` ahead, ``behind_m`` behind and
  ``side_m`` to each side (so the ego sits ``behind_m / (ahead_m + behind_m)`` of the height from the bottom).
  Each kind of thing has its own gray level (:data:`OFF_ROAD` ... :data:`VEHICLE`), far apart, so a car never
  looks like road. Pixels need not be square: at the defaults and 64x64 they are 1 m along and 0.5 m across.

Both are headless (plain pygame surfaces and numpy) and fixed in shape, so the observation contract
(``uint8[stack, H, W]``) and the replay buffer's frame-once storage are the same for both.

How the bird's-eye view is fast (~0.2 ms a frame at 64x64): the road never moves, so its lanes are drawn once,
world-aligned, onto a canvas around the ego (pygame polygons and lines through points sampled with highway-env's
``lane.position(s, lateral)``), redrawn only when the ego has driven ``margin`` metres from the canvas' centre.
Each frame then reads the canvas at the world positions of its pixel centres (one rotation, one numpy gather) and
draws the vehicles analytically on the frame's own pixel grid (a point-in-rectangle test per pixel near each
car), so a car is exactly where its position says, whatever the canvas resolution.

Handedness: highway-env's world has y pointing down (screen coordinates) and headings turning clockwise; the
driver's left, seen from above on that screen, is ``(sin h, -cos h)`` for heading ``h``. The frame's left is that.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # SDL_VIDEODRIVER is set by av_td3.envs.highway before pygame
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
from highway_env.road.graphics import RoadGraphics, WorldSurface  # noqa: E402
from highway_env.road.lane import AbstractLane, CircularLane, LineType, StraightLane  # noqa: E402
from highway_env.road.road import Road  # noqa: E402
from highway_env.vehicle.kinematics import Vehicle  # noqa: E402

from av_td3.config import BevConfig  # noqa: E402

VIEW_METRES = 50.0  # world view: width of the world the frame shows, whatever its pixel size

# Bird's-eye view gray levels: far apart so that the first convolution tells them apart at any brightness.
OFF_ROAD = 0
ROAD = 70
MARKING = 130
EGO = 190
VEHICLE = 255
DASH_M, DASH_PERIOD_M = 3.0, 8.0  # striped markings: 3 m dashes every 8 m (visible at 1 m per pixel)
CURVE_STEP_M = 1.0  # sampling step along curved lanes (a 15 m radius bends 4 degrees per step)
MAX_CANVAS_PX = 2048  # the canvas' resolution drops below 2 samples per frame pixel rather than grow past this


class WorldView:
    """highway-env's axis-aligned top view (``env.view=world``), :data:`VIEW_METRES` wide, ego centred."""

    def __init__(self, height: int, width: int) -> None:
        self._frame = _world_surface(width, height, scaling=width / VIEW_METRES)
        # The road is drawn once onto a canvas three frames wide and high, and each frame copies its window:
        # highway-env's lane drawing is most of the rendering time. Redrawn when the frame would leave it.
        self._canvas = _world_surface(3 * width, 3 * height, scaling=width / VIEW_METRES)
        self._canvas_centre: np.ndarray | None = None

    def reset(self) -> None:
        """A new road object (every episode): draw it afresh."""
        self._canvas_centre = None

    def render(self, road: Road, ego: Vehicle) -> np.ndarray:
        """The grayscale top view, uint8[H, W], drawn by highway-env's graphics classes."""
        frame, canvas = self._frame, self._canvas
        view = np.array(frame.get_size()) / frame.scaling  # metres
        # The frame stays on the canvas while the ego is within one view of its centre (0.9: pixel rounding).
        if self._canvas_centre is None or np.any(np.abs(ego.position - self._canvas_centre) > 0.9 * view):
            canvas.move_display_window_to(ego.position)
            RoadGraphics.display(road, canvas)
            self._canvas_centre = ego.position.copy()
        frame.move_display_window_to(ego.position)
        # Snap the frame onto the canvas' pixel grid so the copied road and the cars drawn on it line up exactly.
        offset = np.round((frame.origin - canvas.origin) * frame.scaling)
        frame.origin = canvas.origin + offset / frame.scaling
        frame.blit(canvas, (0, 0), area=pygame.Rect(int(offset[0]), int(offset[1]), *frame.get_size()))
        RoadGraphics.display_road_objects(road, frame, offscreen=True)
        RoadGraphics.display_traffic(road, frame, offscreen=True)
        gray = pygame.transform.grayscale(frame)
        return pygame.surfarray.pixels_red(gray).T.copy()  # surfarray is [W, H]


def _world_surface(width: int, height: int, scaling: float) -> WorldSurface:
    """A highway-env drawing surface of width x height pixels, `scaling` pixels per metre, centred on its target."""
    surface = WorldSurface((width, height), 0, pygame.Surface((width, height)))
    surface.scaling = scaling
    surface.centering_position = [0.5, 0.5]
    return surface


class BirdsEyeView:
    """Ego-centred, heading-up bird's-eye view (``env.view=bev``): off-road :data:`OFF_ROAD`, drivable
    :data:`ROAD`, lane markings :data:`MARKING`, the ego car :data:`EGO`, other vehicles :data:`VEHICLE`."""

    def __init__(self, height: int, width: int, cfg: BevConfig) -> None:
        self.height, self.width, self.cfg = height, width, cfg
        self.m_per_row = (cfg.ahead_m + cfg.behind_m) / height  # metres along the ego's heading per pixel row
        self.m_per_col = 2 * cfg.side_m / width  # metres across per pixel column
        # Ego-frame coordinates (x forward, y left, metres) of every pixel centre: row 0 is the far end ahead,
        # column 0 the far left.
        self._fwd = (cfg.ahead_m - (np.arange(height) + 0.5) * self.m_per_row)[:, None].repeat(width, 1)
        self._left = (cfg.side_m - (np.arange(width) + 0.5) * self.m_per_col)[None, :].repeat(height, 0)
        # Everything the frame shows lies within `reach` of the ego; the canvas holds the road `margin` beyond it.
        self.reach = math.hypot(max(cfg.ahead_m, cfg.behind_m), cfg.side_m)
        self.margin = self.reach
        half = self.reach + self.margin
        # Two canvas pixels per frame pixel (the finer axis), so thin markings survive the nearest-pixel reads.
        self.px_per_m = min(2.0 / min(self.m_per_row, self.m_per_col), MAX_CANVAS_PX / (2 * half))
        self._canvas_px = int(math.ceil(2 * half * self.px_per_m))
        # 8 bits a pixel, the palette mapping index i to gray i: drawn values are the gray levels themselves, and
        # the canvas is read as one uint8 array (a copy of a 32-bit surface's red channel is ~20x slower).
        self._surface = pygame.Surface((self._canvas_px, self._canvas_px), depth=8)
        self._surface.set_palette([(i, i, i) for i in range(256)])
        # Markings at least one frame pixel thick along either axis, so a marking at any angle stays a line.
        self._marking_px = max(1, round(max(self.m_per_row, self.m_per_col) * self.px_per_m))
        self._canvas: np.ndarray | None = None  # uint8 [x, y] (pygame's order), world-aligned
        self._origin = np.zeros(2)  # world position (m) of the canvas' corner pixel (0, 0)
        self._centre = np.zeros(2)
        # World geometry of the road's curved lanes (sampled whole), by id(lane); emptied with each new road.
        self._curved: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

    def reset(self) -> None:
        """A new road object (every episode): draw it afresh."""
        self._canvas = None
        self._curved = {}

    def pixel(self, forward_m: float, left_m: float) -> tuple[int, int]:
        """(row, column) of the frame pixel holding the ego-frame point ``forward_m`` ahead, ``left_m`` to the left."""
        return (int(math.floor((self.cfg.ahead_m - forward_m) / self.m_per_row)),
                int(math.floor((self.cfg.side_m - left_m) / self.m_per_col)))

    def render(self, road: Road, ego: Vehicle) -> np.ndarray:
        """The bird's-eye frame, uint8[H, W], of ``road`` as seen from ``ego``."""
        position = np.asarray(ego.position, dtype=np.float64)
        canvas = self._canvas
        if canvas is None or np.any(np.abs(position - self._centre) > self.margin):
            canvas = self._draw_road(road, position)
        forward = np.array([math.cos(ego.heading), math.sin(ego.heading)])
        left = np.array([math.sin(ego.heading), -math.cos(ego.heading)])  # driver's left in a y-down world
        # World position of every pixel centre, in canvas pixels; the canvas covers them all (see margin).
        cx = (position[0] - self._origin[0] + self._fwd * forward[0] + self._left * left[0]) * self.px_per_m
        cy = (position[1] - self._origin[1] + self._fwd * forward[1] + self._left * left[1]) * self.px_per_m
        last = self._canvas_px - 1
        frame = canvas[np.clip(cx.astype(np.intp), 0, last), np.clip(cy.astype(np.intp), 0, last)]
        for vehicle in road.vehicles:  # the ego last, so it stays whole when it touches another car
            if vehicle is not ego:
                self._draw_vehicle(frame, vehicle, position, forward, left, ego.heading, VEHICLE)
        self._draw_vehicle(frame, ego, position, forward, left, ego.heading, EGO)
        return frame

    # --- the road canvas -----------------------------------------------------------------------------------
    def _draw_road(self, road: Road, centre: np.ndarray) -> np.ndarray:
        """Draw every lane near ``centre`` onto the world-aligned canvas (returned): surfaces, then their markings."""
        surface, half = self._surface, self._canvas_px / (2 * self.px_per_m)
        # The canvas' pixel grid is the world's fixed grid of 1/px_per_m cells, wherever it is centred: a frame
        # reads the same cells from a redrawn canvas, so nothing shifts by a pixel when the canvas moves.
        self._centre, self._origin = centre.copy(), np.floor((centre - half) * self.px_per_m) / self.px_per_m
        surface.fill(OFF_ROAD)
        lanes = [lane for to_dict in road.network.graph.values() for to_lanes in to_dict.values()
                 for lane in to_lanes]
        shapes = [self._lane_geometry(lane, centre, half * math.sqrt(2)) for lane in lanes]
        for shape in shapes:
            if shape is not None:
                outline = self._to_canvas(shape[0])
                pygame.draw.polygon(surface, ROAD, outline)
                # an outline 2 px wide: the fill leaves single pixels open at seams between lanes, and the
                # racetrack's diagonal lanes lie 0.09 m apart (a hairline at 8 px/m)
                pygame.draw.polygon(surface, ROAD, outline, 2)
        for shape in shapes:
            for line in shape[1] if shape is not None else []:
                pygame.draw.lines(surface, MARKING, False, self._to_canvas(line), self._marking_px)
        self._canvas = np.array(pygame.surfarray.pixels2d(surface))  # [x, y], a copy: the surface stays unlocked
        return self._canvas

    def _lane_geometry(self, lane: AbstractLane, centre: np.ndarray,
                       radius: float) -> tuple[np.ndarray, list[np.ndarray]] | None:
        """World points (metres) of ``lane``'s surface polygon [n, 2] and of its marking polylines; None when it is
        farther than ``radius`` from ``centre``. A straight lane is cut to that circle (highway's lanes are 10 km
        long) and needs only its ends; other lanes are sampled whole, every :data:`CURVE_STEP_M`, once a road."""
        if isinstance(lane, StraightLane):
            s, lateral = lane.local_coordinates(centre)
            s0, s1 = max(0.0, s - radius), min(lane.length, s + radius)
            return self._sample_lane(lane, s0, s1) if abs(lateral) <= radius and s1 > s0 else None
        if id(lane) not in self._curved:
            self._curved[id(lane)] = self._sample_lane(lane, 0.0, float(lane.length))
        return self._curved[id(lane)]

    @staticmethod
    def _sample_lane(lane: AbstractLane, s0: float, s1: float) -> tuple[np.ndarray, list[np.ndarray]]:
        """Surface polygon and marking polylines of ``lane`` between longitudinal positions s0 and s1 (metres)."""
        def along(lo: float, hi: float) -> np.ndarray:  # the ends on a straight lane, every CURVE_STEP_M else
            if isinstance(lane, StraightLane):
                return np.array([lo, hi])
            return np.linspace(lo, hi, max(2, int(math.ceil((hi - lo) / CURVE_STEP_M)) + 1))

        def edge(s: np.ndarray, side: int) -> np.ndarray:  # side 0: lateral -width/2, 1: +width/2 (highway-env's)
            return _positions(lane, s, side - 0.5)

        s = along(s0, s1)
        polygon = np.concatenate([edge(s, 0), edge(s[::-1], 1)])
        lines = []
        for side, line_type in enumerate(lane.line_types):
            if line_type in (LineType.CONTINUOUS, LineType.CONTINUOUS_LINE):
                lines.append(edge(s, side))
            elif line_type == LineType.STRIPED:  # dashes at fixed places along the lane, wherever the cut falls
                for start in np.arange(math.floor(s0 / DASH_PERIOD_M) * DASH_PERIOD_M, s1, DASH_PERIOD_M):
                    lo, hi = max(start, s0), min(start + DASH_M, s1)
                    if hi > lo:
                        lines.append(edge(along(lo, hi), side))
        return polygon, lines

    def _to_canvas(self, points: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in ((points - self._origin) * self.px_per_m).tolist()]

    # --- vehicles ------------------------------------------------------------------------------------------
    def _draw_vehicle(self, frame: np.ndarray, vehicle: Vehicle, ego_xy: np.ndarray, forward: np.ndarray,
                      left: np.ndarray, ego_heading: float, value: int) -> None:
        """Fill the pixels whose centres lie inside ``vehicle``'s rectangle (its LENGTH x WIDTH, metres)."""
        d = np.asarray(vehicle.position, dtype=np.float64) - ego_xy
        half_l, half_w = vehicle.LENGTH / 2, vehicle.WIDTH / 2
        if math.hypot(d[0], d[1]) > self.reach + math.hypot(half_l, half_w):
            return  # cannot touch the frame
        x, y = float(d @ forward), float(d @ left)  # ego frame, metres
        turn = vehicle.heading - ego_heading  # clockwise in the y-down world = to the driver's right
        u = (math.cos(turn), -math.sin(turn))  # the vehicle's heading in the ego frame (x forward, y left)
        # Rows and columns of its bounding box in the frame, then the exact test on those pixel centres only.
        ext_x = abs(u[0]) * half_l + abs(u[1]) * half_w
        ext_y = abs(u[1]) * half_l + abs(u[0]) * half_w
        r0, c0 = self.pixel(x + ext_x, y + ext_y)
        r1, c1 = self.pixel(x - ext_x, y - ext_y)
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, self.height - 1), min(c1, self.width - 1)
        if r0 > r1 or c0 > c1:
            return
        px = self._fwd[r0:r1 + 1, c0:c1 + 1] - x
        py = self._left[r0:r1 + 1, c0:c1 + 1] - y
        inside = (np.abs(px * u[0] + py * u[1]) <= half_l) & (np.abs(-px * u[1] + py * u[0]) <= half_w)
        frame[r0:r1 + 1, c0:c1 + 1][inside] = value


def _positions(lane: AbstractLane, s: np.ndarray, width_fraction: float) -> np.ndarray:
    """World points [n, 2] of ``lane.position(s_i, width_fraction * lane.width_at(s_i))``: highway-env's own formula
    on all of ``s`` at once for its straight and circular lanes (a reset samples ~1800 points on the racetrack),
    its per-point method for any other kind."""
    s = np.asarray(s, dtype=np.float64)
    if type(lane) is StraightLane:
        lateral = width_fraction * lane.width
        return lane.start + s[:, None] * lane.direction + lateral * lane.direction_lateral
    if type(lane) is CircularLane:
        lateral = width_fraction * lane.width
        phi = lane.direction * s / lane.radius + lane.start_phase
        return lane.center + (lane.radius - lateral * lane.direction) * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    return np.array([lane.position(si, width_fraction * lane.width_at(si)) for si in s]).reshape(-1, 2)
