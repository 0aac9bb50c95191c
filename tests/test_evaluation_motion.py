"""The centroid tracker of the motion-direction benchmark, on emoji-motion's clips and on static ones."""

import numpy as np
import pytest
import torch

from matryoshka.data import DataConfig
from matryoshka.data.emoji_motion import MOTIONS, EmojiMotionDataset, render_clip
from matryoshka.evaluation.motion import DIRECTIONS, direction_scores, track


@pytest.fixture(scope="module", params=[(16, 4), (32, 8)], ids=["4x16", "8x32"])
def motion(request) -> EmojiMotionDataset:
    side, frames = request.param
    return EmojiMotionDataset(DataConfig(source="emoji-motion", resolution=side, frames=frames, captions=True))


def directed_items(dataset: EmojiMotionDataset, sprites: int) -> list[tuple[int, str]]:
    """(item, direction) of the four directed motions of ``sprites`` emoji spread over the set."""
    count = len(dataset) // len(MOTIONS)
    emoji = np.linspace(0, count - 1, sprites).astype(int)
    return [(e * len(MOTIONS) + m, MOTIONS[m].split()[-1]) for e in emoji for m in range(4)]


def test_emoji_motion_clips_move_the_way_their_captions_say(motion):
    items = directed_items(motion, 40)
    prompted, detected = [], []
    for index, direction in items:
        clip = motion[index]
        assert clip["caption"].endswith(f"moving {direction}")
        prompted.append(direction)
        detected.append(track(clip["image"]).direction)
    scores = direction_scores(prompted, detected)
    assert scores["clips"] == 160 and scores["no_motion"] == 0
    assert scores["fraction"] == 1.0, [(i, d) for (i, _), d, w in zip(items, detected, prompted) if d != w]
    assert all(scores["per_direction"][name]["fraction"] == 1.0 for name in DIRECTIONS)


def test_uint8_frames_and_tensors_track_alike(motion):
    index = directed_items(motion, 1)[1][0]  # moving right
    frames, _ = motion.clip(index)
    from_pixels, from_tensor = track(frames), track(motion[index]["image"])
    assert from_pixels.direction == from_tensor.direction == "right"
    assert from_pixels.dx == pytest.approx(from_tensor.dx, abs=0.5)
    # The sprite crosses half the side: the net motion is about that.
    assert from_pixels.dx == pytest.approx(motion.cfg.resolution / 2, rel=0.25) and abs(from_pixels.dy) < 1


def test_static_and_empty_clips_have_no_direction(motion):
    side, frames = motion.cfg.resolution, motion.cfg.frames
    for index in range(0, len(motion), 1999):
        first, _ = motion.clip(index)
        still = np.repeat(first[:1], frames, axis=0)  # the first frame held: the sprite does not move
        assert track(still).direction is None
    blank = np.full((frames, side, side, 3), 200, np.uint8)
    result = track(blank)
    assert result.direction is None and np.isnan(result.centroids).all()
    # Motions without a direction stay below the threshold too (rotating and growing stay centred).
    for motion_index in (MOTIONS.index("rotating"), MOTIONS.index("growing")):
        assert track(motion[motion_index]["image"]).direction is None


def test_noise_has_no_direction():
    generator = torch.Generator().manual_seed(0)
    clips = torch.rand(64, 3, 8, 32, 32, generator=generator) * 2 - 1
    prompted = [DIRECTIONS[i % 4] for i in range(64)]
    scores = direction_scores(prompted, [track(clip).direction for clip in clips])
    assert scores["no_motion"] == 64 and scores["fraction"] == 0


def test_a_sprite_drawn_by_hand_is_followed():
    sprite = np.zeros((8, 8, 3), np.uint8)
    sprite[..., 0] = 220  # a red square on a white background
    clip = render_clip(sprite, "moving up", (255, 255, 255), 6)
    result = track(clip)
    assert result.direction == "up" and result.dy < -3
    assert np.all(np.diff(result.centroids[:, 1]) <= 0)  # frame to frame, never down


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8 frames"):
        track(np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="clip"):
        track(torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown directions"):
        direction_scores(["sideways"], [None])
    with pytest.raises(ValueError, match="tracks"):
        direction_scores(["left"], [])
