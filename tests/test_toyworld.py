import json

import pydantic
import pytest
import torch
from PIL import Image

from biwm.core.camera import actions_to_poses, parse_keys, poses_to_actions
from biwm.toyworld.world import (
    HELDOUT_SEED_START,
    ToyClips,
    ToyWorldConfig,
    load_dataset,
    make_scenes,
    render_clips,
    split_seeds,
    write_dataset,
)

SMALL = ToyWorldConfig(height=32, width=32)
STILL_WORLD = ToyWorldConfig(height=32, width=32, num_moving=0)


def keys(text: str, clips: int = 1) -> torch.Tensor:
    return parse_keys(text)[None].repeat(clips, 1)


def best_shift(before: torch.Tensor, after: torch.Tensor, dim: int, max_shift: int = 6) -> int:
    """Integer shift along dim (columns -1, rows -2) that best maps ``before`` onto ``after``."""
    before, after = before.float().mean(-3), after.float().mean(-3)
    size = before.shape[dim]

    def error(shift: int) -> float:
        moved = before.narrow(dim, max(0, -shift), size - abs(shift))
        target = after.narrow(dim, max(0, shift), size - abs(shift))
        return (moved - target).abs().mean().item()

    return min(range(-max_shift, max_shift + 1), key=error)


def test_render_shapes_and_dtypes():
    clips = render_clips([1, 2], 5, SMALL)
    assert clips.frames.shape == (2, 5, 3, 32, 32) and clips.frames.dtype == torch.uint8
    assert clips.camera.c2w.shape == (2, 5, 4, 4) and clips.camera.c2w.dtype == torch.float32
    assert clips.camera.intrinsics.shape == (2, 3, 3)
    assert clips.camera.actions.shape == (2, 5) and clips.camera.actions.dtype == torch.long
    assert clips.seeds == [1, 2]
    frames = clips.frames_float()
    assert frames.dtype == torch.float32 and -1 <= frames.min() and frames.max() <= 1
    assert clips.frames.float().std() > 10  # textured, not a flat colour
    assert clips.to("cpu").frames.shape == clips.frames.shape


def test_same_seed_is_deterministic_and_independent_of_batch():
    first = render_clips([5, 9], 8, SMALL)
    again = render_clips([5, 9], 8, SMALL)
    assert torch.equal(first.frames, again.frames)
    assert torch.equal(first.camera.c2w, again.camera.c2w)
    assert torch.equal(first.camera.actions, again.camera.actions)
    alone = render_clips([9], 8, SMALL)
    assert torch.equal(alone.frames[0], first.frames[1]) and torch.equal(alone.camera.c2w[0], first.camera.c2w[1])
    assert not torch.equal(first.frames[0], first.frames[1])
    assert not torch.equal(first.camera.actions[0], first.camera.actions[1])


def test_poses_and_actions_are_consistent():
    seeds = list(range(6))
    clips = render_clips(seeds, 24, SMALL)
    start = make_scenes(seeds, SMALL).start_c2w
    steps = {"move_step": SMALL.move_step, "turn_step_deg": SMALL.turn_step_deg}
    assert torch.equal(poses_to_actions(clips.camera.c2w, start_c2w=start, **steps), clips.camera.actions)
    assert torch.allclose(actions_to_poses(clips.camera.actions, start, **steps), clips.camera.c2w, atol=1e-5)
    replayed = render_clips(seeds, 24, SMALL, actions=clips.camera.actions)
    assert torch.allclose(replayed.camera.c2w, clips.camera.c2w, atol=1e-5)
    assert torch.equal(replayed.camera.actions, clips.camera.actions)
    assert (replayed.frames.int() - clips.frames.int()).abs().max() <= 1
    from_poses = render_clips(seeds, 24, SMALL, c2w=clips.camera.c2w)
    assert torch.equal(from_poses.frames, clips.frames)
    assert (from_poses.camera.actions[:, 0] == 0).all()
    assert torch.equal(from_poses.camera.actions[:, 1:], clips.camera.actions[:, 1:])


def test_camera_stays_in_the_room():
    config = ToyWorldConfig(height=8, width=8)
    clips = render_clips([0, 1, 2, 3], 60, config, actions=keys("w*60", 4))
    limit = config.room_half_size - config.clearance
    assert clips.camera.c2w[..., [0, 2], 3].abs().max() <= limit
    # Each walk ends against a wall or box: the blocked moves are stored as idle.
    assert (clips.camera.actions[:, -1] == 0).all()
    scenes = make_scenes(range(32), config)
    walks = actions_to_poses(keys("d*20,w*40", 32), scenes.start_c2w, is_free=scenes.is_free)
    assert walks[..., [0, 2], 3].abs().max() <= limit
    assert all(scenes.is_free(walks[:, t, :3, 3]).all() for t in range(walks.shape[1]))


def test_idle_camera_in_a_still_world_gives_identical_frames():
    clips = render_clips([3, 4], 6, STILL_WORLD, actions=torch.zeros(2, 6, dtype=torch.long))
    assert torch.equal(clips.frames, clips.frames[:, :1].expand_as(clips.frames))


def test_moving_boxes_move_under_a_still_camera():
    config = ToyWorldConfig(height=32, width=32, num_boxes=4, num_moving=4, max_speed=0.2)
    clips = render_clips([3, 4, 5], 12, config, actions=torch.zeros(3, 12, dtype=torch.long))
    assert (clips.camera.c2w == clips.camera.c2w[:, :1]).all()
    changed = (clips.frames[:, -1].int() - clips.frames[:, 0].int()).abs().amax(dim=(1, 2, 3))
    assert (changed > 20).all()


def test_camera_motion_changes_frames():
    clips = render_clips([6, 7], 4, STILL_WORLD, actions=keys("w,a,j,i", 2))
    differences = (clips.frames[:, 1:].float() - clips.frames[:, :-1].float()).abs().mean(dim=(2, 3, 4))
    assert (differences > 1).all()


def test_turns_shift_image_content_the_documented_way():
    config = ToyWorldConfig(height=32, width=32, num_moving=0, turn_step_deg=10.0)
    for seed in (0, 1, 2):
        clips = render_clips([seed] * 3, 2, config, actions=keys("_,j,_,l,_,i").view(3, 2))
        left, right, up = clips.frames
        assert best_shift(left[0], left[1], dim=-1) > 0  # yaw left: content moves right
        assert best_shift(right[0], right[1], dim=-1) < 0  # yaw right: content moves left
        assert best_shift(up[0], up[1], dim=-2) > 0  # pitch up: content moves down


def test_split_seeds_are_disjoint():
    train, heldout = split_seeds("train", 1000), split_seeds("heldout", 1000)
    assert train == list(range(1000)) and heldout[0] == HELDOUT_SEED_START
    assert not set(train) & set(heldout)
    assert split_seeds("train", 3, start=10) == [10, 11, 12]
    with pytest.raises(ValueError):
        split_seeds("train", 10, start=HELDOUT_SEED_START - 5)
    with pytest.raises(ValueError):
        split_seeds("test", 3)


def test_config_and_argument_validation():
    with pytest.raises(pydantic.ValidationError):
        ToyWorldConfig(colour="red")
    with pytest.raises(pydantic.ValidationError):
        ToyWorldConfig(num_boxes=1, num_moving=2)
    with pytest.raises(pydantic.ValidationError):
        ToyWorldConfig(action_hold=(5, 2))
    assert "field of view" in ToyWorldConfig.model_fields["fov_deg"].description
    with pytest.raises(ValueError, match="not both"):
        render_clips([0], 2, SMALL, actions=torch.zeros(1, 2, dtype=torch.long), c2w=torch.eye(4).expand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="actions"):
        render_clips([0], 3, SMALL, actions=torch.zeros(1, 2, dtype=torch.long))


def test_write_and_load_dataset(tmp_path):
    config = ToyWorldConfig(height=16, width=16)
    calls = []
    out = write_dataset(
        tmp_path / "toy", "heldout", 5, 4, config, progress=lambda done, total: calls.append((done, total)), batch_size=2
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert sorted(p.name for p in out.iterdir()) == ["clips.safetensors", "config.json", "preview.png"]
    description = json.loads((out / "config.json").read_text())
    assert description["split"] == "heldout" and ToyWorldConfig(**description["config"]) == config
    assert Image.open(out / "preview.png").size[0] == 4 * 16

    loaded = load_dataset(out)
    expected = render_clips(split_seeds("heldout", 5), 4, config)
    assert isinstance(loaded, ToyClips) and loaded.seeds == expected.seeds
    assert torch.equal(loaded.frames, expected.frames)
    assert torch.equal(loaded.camera.c2w, expected.camera.c2w)
    assert torch.equal(loaded.camera.actions, expected.camera.actions)
    assert torch.equal(load_dataset(out / "clips.safetensors").frames, loaded.frames)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="clips.safetensors"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(tmp_path / "missing")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_dataset(garbage)
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"frames": torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8)}, str(partial))
    with pytest.raises(ValueError, match="'c2w' is missing"):
        load_dataset(partial)


def test_still_stretches_hold_the_camera_for_a_share_of_clips():
    from biwm.toyworld.world import ToyWorldConfig, random_actions, render_clips, still_stretches

    seeds = list(range(400))
    mask = still_stretches(seeds, 33, 0.25)
    still = mask.any(1)
    assert 0.18 < float(still.float().mean()) < 0.32  # about a quarter of the clips
    lengths = mask.sum(1)[still]
    assert int(lengths.min()) >= 17 and int(lengths.max()) <= 33
    for row in mask[still]:  # one contiguous stretch per clip
        idx = row.nonzero().flatten()
        assert int(idx[-1] - idx[0] + 1) == len(idx)
    assert torch.equal(still_stretches(seeds[:50], 33, 0.25), mask[:50])  # chosen by seed, not by position
    assert not still_stretches(seeds, 33, 0.0).any() and still_stretches(seeds, 33, 1.0).any(1).all()
    with pytest.raises(ValueError, match="still fraction"):
        still_stretches(seeds, 33, 1.5)

    # rendered with those frames idle, the camera stays put there while the moving boxes still move
    config = ToyWorldConfig(height=16, width=16)
    pick = [s for s, m in zip(seeds, still) if m][:2]
    stretch = still_stretches(pick, 33, 0.25)
    actions = torch.where(stretch, 0, random_actions(pick, 33, config))
    clips = render_clips(pick, 33, config, actions=actions)
    for row in range(2):
        idx = stretch[row].nonzero().flatten()
        poses = clips.camera.c2w[row, idx[0]:idx[-1] + 1]
        assert torch.allclose(poses, poses[:1].expand_as(poses))
