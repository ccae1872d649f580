"""Image augmentation for the learner (``agent.augment``), applied to the batch in the TD3 update only.

``shift`` is DrQ's random shift (Kostrikov et al. 2020; Yarats et al. 2021, DrQ-v2): each image of the batch is
padded by ``agent.augment_pad`` pixels on every side, repeating its border pixels, and a window of the original
size is cut from it at a random offset of 0 .. 2 * pad pixels down and across, drawn independently per sample.
All frames of one sample's stack move together, so the motion between them is kept. Observations and next
observations get independent shifts, as in DrQ-v2. Acting and evaluation never see it: :class:`~av_td3.agent.td3.TD3`
calls it from ``update`` only.

The shift is an exact copy of integer-offset pixels: one ``gather`` with per-sample indices, clamped to the
image so that the border pixels repeat (the same as replicate padding, without building the padded batch). No
per-sample Python loop and no interpolation (DrQ-v2 gets the same integer shifts from ``F.grid_sample`` on a
pixel-centred grid). The offsets come from the augmenter's own ``torch.Generator``, seeded from the agent seed
and saved in the agent's checkpoint, so a resumed run draws the same shifts as an uninterrupted one.
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
        """Shifted copy of ``images`` ([N, C, H, W], any dtype; NCHW or channels_last, and the result keeps it)."""
        if self.pad == 0:
            return images
        n, c, h, w = images.shape
        offset = self.offsets(n) - self.pad  # [N, 2]: how far each sample's window moves, -pad .. pad pixels
        # Output pixel (i, j) of sample k reads pixel (i + dy_k, j + dx_k); reading the border pixel where that
        # falls outside is what replicate padding then cropping gives, without building the padded batch.
        rows = (offset[:, 0, None] + torch.arange(h, device=images.device)).clamp_(0, h - 1)  # [N, H]
        cols = (offset[:, 1, None] + torch.arange(w, device=images.device)).clamp_(0, w - 1)  # [N, W]
        index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, h * w)  # flat source pixel, [N, H*W]
        # One gather over the flattened pixels (~ the cost of a copy), in the batch's own memory layout.
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            pixels = images.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the NHWC memory
            out = pixels.gather(1, index[:, :, None].expand(n, h * w, c))
            return out.reshape(n, h, w, c).permute(0, 3, 1, 2)  # NCHW shape, channels_last memory
        out = images.reshape(n, c, h * w).gather(2, index[:, None, :].expand(n, c, h * w))
        return out.reshape(n, c, h, w)

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
