"""The sensor inbox: where CARLA's callbacks leave a tick's camera image and its frame-stamped events; and the
camera image's conversion to the observation's grayscale frame.

CARLA calls sensor callbacks and ``world.on_tick`` callbacks on its own threads, after ``world.tick()`` has
returned: camera images and collision events on their own streams from the server, lane invasions from a
client-side sensor that runs in an on-tick callback (LibCarla's LaneInvasionSensor; CARLA's newer code moves it to
the server, and then it arrives on a stream like the collisions). So a step waits, after its tick of frame N, for
the camera image of frame N and for this inbox's own on-tick callback of frame N (registered after the sensors',
so it runs after the lane-invasion sensor's if the client keeps registration order, which is not verified on a
real server), then a short grace (``env.carla.event_wait_s``) for events of frame N still in flight, and counts the
events stamped with frames up to N. An event that arrives later still is counted at the next step: late, but
never lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KEEP_IMAGES = 8  # images of frames nobody waits for any more are dropped beyond this many


class SensorInbox:
    """Thread-safe hand-over from CARLA's callback threads to the stepping thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._images: list[Any] = []
        self._ticked = -1  # newest frame whose on-tick callback has run
        self._events: dict[str, list[int]] = {"collision": [], "lane_invasion": []}
        # Set to a list to record every callback as (kind, frame, time.monotonic()): the order in which a frame's
        # image, events and on-tick callback arrive (scripts/carla_acceptance.py reports it for a real server).
        self.arrivals: list[tuple[str, int, float]] | None = None

    # --- callbacks (CARLA's threads) ----------------------------------------------------------------------
    def image(self, image: Any) -> None:
        with self._cond:
            self._arrived("image", image.frame)
            self._images = (self._images + [image])[-KEEP_IMAGES:]
            self._cond.notify_all()

    def collision(self, event: Any) -> None:
        with self._cond:
            self._arrived("collision", event.frame)
            self._events["collision"].append(int(event.frame))

    def lane_invasion(self, event: Any) -> None:
        with self._cond:
            self._arrived("lane_invasion", event.frame)
            self._events["lane_invasion"].append(int(event.frame))

    def on_tick(self, snapshot: Any) -> None:
        with self._cond:
            self._arrived("on_tick", snapshot.frame)
            self._ticked = max(self._ticked, int(snapshot.frame))
            self._cond.notify_all()

    def _arrived(self, kind: str, frame: int) -> None:
        if self.arrivals is not None:
            self.arrivals.append((kind, int(frame), time.monotonic()))

    # --- the stepping thread ------------------------------------------------------------------------------
    def wait(self, frame: int, timeout_s: float, grace_s: float) -> Any:
        """The camera image of ``frame`` once it and the frame's on-tick callback have arrived, after ``grace_s``
        more seconds for events in flight. A RuntimeError naming the time-out (handled as a lost server) when they
        do not arrive within ``timeout_s``."""
        with self._cond:
            arrived = self._cond.wait_for(
                lambda: self._ticked >= frame and any(i.frame >= frame for i in self._images), timeout=timeout_s)
            if not arrived:
                what = "camera image" if not any(i.frame >= frame for i in self._images) else "on-tick callback"
                raise RuntimeError(f"time-out of {timeout_s:g}s waiting for the {what} of frame {frame}")
            later = [i for i in self._images if i.frame >= frame]
            image = min(later, key=lambda i: i.frame)
            if image.frame > frame:  # only when some other client ticks this server too
                log.warning("camera image of frame %d arrived for tick %d: is another client ticking the server?",
                            image.frame, frame)
            self._images = [i for i in self._images if i.frame > image.frame]  # earlier ones are stale
        if grace_s > 0:
            time.sleep(grace_s)
        return image

    def take(self, kind: str, up_to_frame: int) -> int:
        """How many ``kind`` events ("collision", "lane_invasion") are stamped with frames up to ``up_to_frame``;
        they are removed, later ones kept for their own step."""
        with self._cond:
            events = self._events[kind]
            n = sum(f <= up_to_frame for f in events)
            self._events[kind] = [f for f in events if f > up_to_frame]
        return n


def to_gray(image: Any, height: int, width: int) -> np.ndarray:
    """BGRA camera image → uint8[height, width] grayscale (the embedded env's luma weights), resized bilinearly
    when the camera's size differs."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
    gray = np.rint(0.299 * bgra[..., 2] + 0.587 * bgra[..., 1] + 0.114 * bgra[..., 0])
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    if gray.shape != (height, width):
        from PIL import Image  # installed with matplotlib; only needed when camera and image sizes differ
        gray = np.asarray(Image.fromarray(gray).resize((width, height), Image.Resampling.BILINEAR))
    return gray
