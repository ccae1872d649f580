"""Image augmentation for the learner (``agent.augment``), applied to the batch in the TD3 update only.

``shift`` is DrQ's random shift (Kostrikov et al. 2020; Yarats et al. 2021, DrQ-v2): each image of the batch is
padded by ``agent.augment_pad`` pixels on every side, repeating its border pixels, and a window of the original
size is cut from it at a random offset of 0 .. 2 * pad pixels down and across, drawn independently per sample.
All frames of one sample's stack move together, so the motion between them is kept. Observations and next
observations get independent shifts, as in DrQ-v2. Acting and evaluation never see it: :class:`~av_td3.agent.td3.TD3`
calls it from ``update`` only.

The shift is an exact copy of integer-offset pixels, done on the uint8 frames before they become floats (a
quarter of the bytes, the same values): each image row is padded by ``pad`` copies of its end pixels, and every
output row is then one contiguous run of ``W`` bytes read from the padded rows, at the sample's row (clamped to the
image: replicate padding down and up) and column offset. One ``index_select`` of ``N * C * H`` such runs, no
per-sample Python loop and no interpolation (DrQ-v2 gets the same integer shifts from ``F.grid_sample`` on a
pixel-centred grid). The per-pixel ``gather`` on the float images this replaced took 25 ms a call against 0.8 ms
(torch profiler, one thread, batch 128 of 4x64x64, 2-core AMD EPYC; see benchmarks/README.md). The offsets come
from the augmenter's own ``torch.Generator``, seeded from the agent seed and saved in the agent's checkpoint, so a
resumed run draws the same shifts as an uninterrupted one.
"""

from __future__ import annotations

import torch

from av_td3.config import ConfigError

AUGMENTS = ("none", "shift")


class RandomShift:
    """DrQ random shift of an image batch [N, C, H, W]: replicate-pad by ``pad`` pixels, crop back to H x W at
    a per-sample random offset. ``pad=0`` returns the batch unchanged."""

    def __init__(self, pad: int, device: torch.device, seed: int) -> None:
        if pad < 0:
            raise ConfigError(f"agent.augment_pad={pad} is out of range: it must be >= 0.")
        self.pad = pad
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def offsets(self, n: int) -> torch.Tensor:
        """Draw ``n`` (down, across) offsets in pixels into the padded image, int64 [n, 2], each in 0 .. 2 * pad."""
        return torch.randint(0, 2 * self.pad + 1, (n, 2), generator=self.generator, device=self.generator.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Shifted copy of ``images`` ([N, C, H, W], any dtype and strides; TD3 passes the uint8 frames), contiguous."""
        if self.pad == 0:
            return images
        n, c, h, w = images.shape
        pad, device = self.pad, images.device
        offset = self.offsets(n) - pad  # [N, 2]: how far each sample's window moves, -pad .. pad pixels
        # Rows padded left and right with copies of their end pixels: [N, C, H, W + 2 pad], contiguous.
        padded = torch.cat([images[..., :1].expand(n, c, h, pad), images,
                            images[..., -1:].expand(n, c, h, pad)], dim=-1).contiguous()
        # Output row i of sample k's plane reads padded row clamp(i + dy_k) (replicate padding down and up) from
        # column pad + dx_k on: a run of W bytes that starts at that flat position of the padded batch.
        rows = (offset[:, 0, None] + torch.arange(h, device=device)).clamp_(0, h - 1)  # [N, H]
        first_row = torch.arange(n * c, device=device).view(n, c, 1) * h  # of each plane in the padded batch
        starts = (first_row + rows[:, None, :]) * (w + 2 * pad) + pad + offset[:, 1, None, None]  # [N, C, H]
        runs = padded.view(-1).unfold(0, w, 1)  # [positions, W]: the W values from each flat position, a view
        return runs.index_select(0, starts.view(-1)).view(n, c, h, w)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.generator.set_state(d["generator"])


def make(name: str, pad: int, device: torch.device, seed: int) -> RandomShift | None:
    """The augmentation ``agent.augment`` names, or None for ``none`` (the update then runs exactly as without)."""
    if name == "none":
        return None
    if name == "shift":
        return RandomShift(pad, device, seed)
    raise ConfigError(f"agent.augment={name!r} is not valid: choose one of {', '.join(AUGMENTS)} "
                      "(e.g. `agent.augment=shift`).")
