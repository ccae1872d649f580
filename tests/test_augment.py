"""agent.augment: DrQ's random shift in the TD3 update only (shape, dtype, exact crops of the replicate-padded
image at the drawn offsets, any strides, independent per sample, seeded and resumable), and never when acting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from av_td3.agent.augment import RandomShift, make
from av_td3.config import ConfigError
from tests.test_td3 import SPEC, make_agent, make_batch, params, same

CPU = torch.device("cpu")


def images(n: int = 16, c: int = 3, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def crop_offset(out: torch.Tensor, image: torch.Tensor, pad: int) -> tuple[int, int] | None:
    """(down, across) offset at which ``out`` [C, H, W] is a crop of ``image`` replicate-padded by ``pad``."""
    padded = F.pad(image[None], (pad,) * 4, mode="replicate")[0]
    h, w = image.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], out):
                return dy, dx
    return None


def test_shift_keeps_shape_dtype_and_layout_and_crops_the_padded_image_exactly() -> None:
    x = images()
    out = RandomShift(4, CPU, seed=0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = [crop_offset(out[i], x[i], 4) for i in range(len(x))]
    assert all(o is not None for o in offsets)  # every frame of a sample moved by one whole-pixel offset
    assert all(0 <= d <= 8 for o in offsets for d in o)
    frames = (x * 255).to(torch.uint8)  # any dtype: the same offsets move uint8 frames the same way
    assert torch.equal(RandomShift(4, CPU, seed=0)(frames), (RandomShift(4, CPU, seed=0)(x) * 255).to(torch.uint8))
    # any strides: the replay's overlapping window views (the update's input) and channels_last give the same
    window = (torch.rand(16, 4, 12, 10, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    view = window[:, 1:]
    assert not view.is_contiguous()
    out = RandomShift(4, CPU, seed=0)(view)
    assert out.is_contiguous() and torch.equal(out, RandomShift(4, CPU, seed=0)(view.contiguous()))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(RandomShift(4, CPU, seed=0)(nhwc), RandomShift(4, CPU, seed=0)(x))


@pytest.mark.parametrize("pad", [1, 4, 9])
def test_shift_moves_each_sample_by_its_drawn_offset(pad: int) -> None:
    """The output is the replicate-padded image cropped at exactly the offsets the generator drew, for pads up to
    and beyond the image's size (the clamp then repeats the border rows and columns further)."""
    x = images(n=6, c=2, h=7, w=5)
    shift = RandomShift(pad, CPU, seed=3)
    offsets = RandomShift(pad, CPU, seed=3).offsets(len(x))  # the same stream: the offsets the shift will draw
    out = shift(x)
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 7, dx:dx + 5])


def test_shift_is_drawn_independently_per_sample_and_moves_the_stack_together() -> None:
    x = images(n=1, c=4).expand(64, -1, -1, -1).contiguous()  # one stack repeated 64 times
    out = RandomShift(4, CPU, seed=0)(x)
    offsets = {crop_offset(out[i], x[i], 4) for i in range(64)}
    assert None not in offsets
    assert len(offsets) >= 20  # 81 possible offsets, 64 draws: many different ones
    assert len({o[0] for o in offsets}) > 1 and len({o[1] for o in offsets}) > 1  # both directions move


def test_pad_zero_is_the_identity_and_none_is_no_augmenter() -> None:
    x = images()
    assert torch.equal(RandomShift(0, CPU, seed=0)(x), x)
    assert make("none", 4, CPU, seed=0) is None
    assert isinstance(make("shift", 4, CPU, seed=0), RandomShift)
    with pytest.raises(ConfigError, match="agent.augment='crop'"):
        make("crop", 4, CPU, seed=0)
    with pytest.raises(ConfigError, match="agent.augment_pad=-1"):
        RandomShift(-1, CPU, seed=0)


def test_shift_is_seeded_and_its_state_resumes_the_stream() -> None:
    x = images()
    a, b = RandomShift(4, CPU, seed=7), RandomShift(4, CPU, seed=7)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(RandomShift(4, CPU, seed=8)(x), RandomShift(4, CPU, seed=7)(x))
    saved = copy.deepcopy(a.state_dict())
    expected = a(x)
    c = RandomShift(4, CPU, seed=0)
    c.load_state_dict(saved)
    assert torch.equal(c(x), expected)


def test_acting_never_shifts() -> None:
    plain, shifted = make_agent(), make_agent(augment="shift", augment_pad=8)
    obs = {"image": make_batch(0).obs_image.numpy(), "state": make_batch(0).obs_state.numpy()}
    assert (plain.act(obs) == shifted.act(obs)).all()  # same seed, same weights: act() reads the frames as they are
    assert (shifted.act(obs) == shifted.act(obs)).all()


def test_augment_changes_the_update_and_resumes_exactly() -> None:
    plain, shifted = make_agent(), make_agent(augment="shift")
    for agent in (plain, shifted):
        for i in range(2):
            agent.update(make_batch(i, reward_scale=50.0), step=i)
    assert not same(params(plain.critic), params(shifted.critic))
    # a copy restored from the state dict draws the same shifts from then on
    resumed = make_agent(augment="shift")
    resumed.load_state_dict(copy.deepcopy(shifted.state_dict()))
    for agent in (shifted, resumed):
        agent.update(make_batch(5, reward_scale=50.0), step=5)
    assert same(params(shifted.critic), params(resumed.critic)) and same(params(shifted.actor), params(resumed.actor))
    # pad 0: the same update as none
    zero = make_agent(augment="shift", augment_pad=0)
    for i in range(2):
        zero.update(make_batch(i, reward_scale=50.0), step=i)
    assert same(params(plain.critic), params(zero.critic))


def test_update_shifts_observations_and_next_observations_independently(monkeypatch) -> None:
    agent = make_agent(augment="shift")
    seen = []
    shift = agent._augment.__call__

    def spy(x: torch.Tensor) -> torch.Tensor:
        out = shift(x)
        seen.append((x, out))
        return out

    monkeypatch.setattr(agent, "_augment", spy)
    batch = make_batch(0)
    batch = batch._replace(next_image=batch.obs_image.clone())  # same frames: only the shifts can differ
    agent.update(batch, step=0)
    (obs_in, obs_out), (next_in, next_out) = seen
    assert torch.equal(obs_in, next_in) and not torch.equal(obs_out, next_out)
    assert obs_out.shape == (8, SPEC.stack, SPEC.height, SPEC.width)


def test_shift_state_survives_a_checkpoint_file(tmp_path) -> None:
    """The generator state goes through the checkpoint format (read back as data only) and resumes the stream."""
    from av_td3.checkpoint import CheckpointManager

    agent = make_agent(augment="shift")
    agent.update(make_batch(0), step=0)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save({"step": 1, "agent": agent.state_dict()}, 1)
    state, _ = manager.load_latest()
    resumed = make_agent(augment="shift")
    resumed.load_state_dict(state["agent"])
    x = images()
    assert torch.equal(agent._augment(x), resumed._augment(x))


def test_shifting_the_frames_before_the_float_conversion_gives_the_floats_shifted() -> None:
    """The update shifts the uint8 frames, then converts them (TD3._images): the same values as converting first
    and shifting the floats, so moving the shift before the conversion (for speed) left the learning unchanged."""
    agent = make_agent(augment="shift")
    frames = make_batch(0).obs_image
    offsets = copy.deepcopy(agent._augment.state_dict())
    shifted_first = agent._images(agent._augment(frames))
    agent._augment.load_state_dict(offsets)
    converted_first = agent._augment(agent._images(frames))
    assert torch.equal(shifted_first, converted_first)
