import math

import pytest
import torch

from biwm.core.camera import (
    NUM_ACTIONS,
    PITCH_LIMIT_DEG,
    ROTATIONS,
    TRANSLATIONS,
    CameraTrack,
    action_label,
    actions_to_poses,
    default_intrinsics,
    format_keys,
    invert_pose,
    parse_keys,
    plucker_rays,
    pose_from_yaw_pitch,
    poses_to_actions,
    relative_poses,
    split_action,
    yaw_pitch_from_pose,
)


def label(translation: str, rotation: str = "none") -> int:
    return action_label(TRANSLATIONS.index(translation), ROTATIONS.index(rotation))


def identity_start(batch: int) -> torch.Tensor:
    return torch.eye(4).expand(batch, 4, 4)


# ----------------------------------------------------------------------------- labels and keys


def test_action_label_round_trip_ints_and_tensors():
    assert NUM_ACTIONS == 81 and len(TRANSLATIONS) == len(ROTATIONS) == 9
    for value in range(NUM_ACTIONS):
        assert action_label(*split_action(value)) == value
    labels = torch.arange(NUM_ACTIONS)
    translation, rotation = split_action(labels)
    assert torch.equal(action_label(translation, rotation), labels)
    assert split_action(label("forward_left", "up_right")) == (5, 6)
    with pytest.raises(ValueError):
        action_label(9, 0)
    with pytest.raises(ValueError):
        split_action(81)


def test_parse_keys_examples():
    expected = [label("forward")] * 8 + [label("left")] * 4 + [label("none", "yaw_left")] * 2
    assert parse_keys("w*8,a*4,j*2").tolist() == expected
    assert parse_keys("wa*3").tolist() == [label("forward_left")] * 3
    assert parse_keys("wj*2").tolist() == [label("forward", "yaw_left")] * 2
    assert parse_keys("wai").tolist() == [label("forward_left", "pitch_up")]
    expected = [label("back_right"), label("none", "down_right"), label("none", "up_right")]
    assert parse_keys("sd,kl,il").tolist() == expected
    assert parse_keys(" _ * 2 , d ").tolist() == [0, 0, label("right")]
    assert parse_keys("w").dtype == torch.long


@pytest.mark.parametrize(
    ("keys", "offending"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("w*2,,a", "position 1"),
        ("ws", "'ws'"),
        ("ad*2", "'ad*2'"),
        ("ik", "'ik'"),
        ("wjl", "'wjl'"),
        ("wx*2", "'x'"),
        ("w*0", "'w*0'"),
        ("w*", "'w*'"),
        ("w*two", "'w*two'"),
        ("_w", "'_w'"),
        ("ww", "'ww'"),
    ],
)
def test_parse_keys_errors_name_token_and_allowed_keys(keys, offending):
    with pytest.raises(ValueError) as error:
        parse_keys(keys)
    assert offending in str(error.value)
    assert "allowed keys" in str(error.value)


def test_format_keys_is_canonical_inverse():
    assert format_keys(parse_keys("w*8,a*4,j*2")) == "w*8,a*4,j*2"
    assert format_keys([0, 0, label("forward_left", "up_left")]) == "_*2,waij"
    labels = torch.randint(0, NUM_ACTIONS, (200,), generator=torch.Generator().manual_seed(0))
    labels = labels.repeat_interleave(torch.randint(1, 4, (200,), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(parse_keys(format_keys(labels)), labels)
    assert torch.equal(parse_keys(format_keys(torch.arange(NUM_ACTIONS))), torch.arange(NUM_ACTIONS))
    with pytest.raises(ValueError):
        format_keys([])
    with pytest.raises(ValueError):
        format_keys([81])


# ----------------------------------------------------------------------------- camera track


def make_track(batch=2, frames=5, actions=True) -> CameraTrack:
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., 0, 3] = torch.arange(batch * frames, dtype=torch.float32).view(batch, frames)
    labels = torch.arange(batch * frames).view(batch, frames) if actions else None
    return CameraTrack(c2w, default_intrinsics(60.0, batch=batch), labels)


def test_camera_track_validation():
    track = make_track()
    assert (track.batch_size, track.num_frames) == (2, 5)
    with pytest.raises(ValueError, match="c2w"):
        CameraTrack(torch.eye(4).repeat(2, 1, 1), track.intrinsics)
    with pytest.raises(ValueError, match="intrinsics"):
        CameraTrack(track.c2w, default_intrinsics(60.0, batch=3))
    with pytest.raises(ValueError, match="actions"):
        CameraTrack(track.c2w, track.intrinsics, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="actions"):
        CameraTrack(track.c2w, track.intrinsics, torch.zeros(2, 5))


def test_camera_track_indexing_and_cat():
    track = make_track()
    assert torch.equal(track.frames(slice(1, 3)).actions, track.actions[:, 1:3])
    picked = track.frames(torch.tensor([4, 0]))
    assert torch.equal(picked.c2w[:, :, 0, 3], track.c2w[:, [4, 0], 0, 3])
    assert torch.equal(picked.actions, track.actions[:, [4, 0]])
    per_clip = track.frames(torch.tensor([[0, 1], [3, 4]]))
    assert per_clip.actions.tolist() == [[0, 1], [8, 9]]
    assert per_clip.c2w[1, :, 0, 3].tolist() == [8.0, 9.0]
    assert track.select(1).actions.tolist() == [[5, 6, 7, 8, 9]]
    assert track.select(torch.tensor([1, 0])).actions[0, 0] == 5
    assert CameraTrack.cat([track, track.select(0)]).batch_size == 3
    joined = CameraTrack.cat([track.frames(slice(0, 2)), track.frames(slice(2, None))], dim=1)
    assert torch.equal(joined.c2w, track.c2w) and torch.equal(joined.actions, track.actions)
    assert track.frames(slice(0, 2)).to("cpu").actions.shape == (2, 2)
    with pytest.raises(ValueError):
        CameraTrack.cat([track, make_track(actions=False)])
    with pytest.raises(ValueError):
        CameraTrack.cat([track, CameraTrack(track.c2w, default_intrinsics(90.0, batch=2))], dim=1)


# ----------------------------------------------------------------------------- actions <-> poses


def project(c2w: torch.Tensor, intrinsics: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Normalised image coordinates of a world point seen from a pose."""
    camera = invert_pose(c2w) @ torch.cat([point, torch.ones(1)])
    return (intrinsics @ (camera[:3] / camera[2]))[:2]


def test_forward_left_and_diagonal_moves_follow_heading():
    facing_x = pose_from_yaw_pitch(torch.zeros(1, 3), torch.full((1,), math.pi / 2))
    moves = {"forward": [0.15, 0, 0], "back": [-0.15, 0, 0], "left": [0, 0, 0.15], "right": [0, 0, -0.15]}
    for name, expected in moves.items():
        pose = actions_to_poses(torch.tensor([[label(name)]]), facing_x)
        assert torch.allclose(pose[0, 0, :3, 3], torch.tensor(expected), atol=1e-6), name
        assert torch.allclose(pose[0, 0, :3, :3], facing_x[0, :3, :3], atol=1e-6)
    diagonal = actions_to_poses(torch.tensor([[label("forward_left")]]), move_step=0.3)
    assert torch.allclose(diagonal[0, 0, :3, 3], torch.tensor([-0.3, 0, 0.3]) / math.sqrt(2), atol=1e-6)
    # A pitched camera still moves horizontally.
    pitched = actions_to_poses(parse_keys("i*4,w")[None])
    assert pitched[0, -1, 1, 3] == 0 and torch.isclose(pitched[0, -1, 2, 3], torch.tensor(0.15))


def test_yaw_left_turns_view_left_and_pitch_up_turns_view_up():
    intrinsics = default_intrinsics(75.0)[0]
    ahead = torch.tensor([0.0, 0.0, 10.0])
    yaw_left = actions_to_poses(parse_keys("j")[None], turn_step_deg=5.0)[0, 0]
    yaw, pitch = yaw_pitch_from_pose(yaw_left)
    assert math.isclose(yaw.item(), -math.radians(5.0), abs_tol=1e-6) and pitch.item() == 0
    assert yaw_left[0, 2] < 0  # heading turned towards -x, i.e. to the left
    assert project(yaw_left, intrinsics, ahead)[0] > 0.5  # content moves right in the image
    assert project(actions_to_poses(parse_keys("l")[None])[0, 0], intrinsics, ahead)[0] < 0.5

    pitch_up = actions_to_poses(parse_keys("i")[None])[0, 0]
    assert pitch_up[1, 2] < 0  # forward tilts towards -y, which is up
    assert project(pitch_up, intrinsics, ahead)[1] > 0.5  # content moves down in the image

    # Yaw is about the world up axis: after pitching, yawing keeps the camera x axis level.
    turned = actions_to_poses(parse_keys("i*3,j*7")[None])[0, -1]
    assert abs(turned[1, 0].item()) < 1e-6


def test_actions_poses_round_trip_random_sequences():
    generator = torch.Generator().manual_seed(0)
    actions = torch.randint(0, NUM_ACTIONS, (16, 12), generator=generator)  # 12 steps cannot pass the clamp
    start = pose_from_yaw_pitch(torch.randn(16, 3, generator=generator), torch.rand(16, generator=generator) * 7)
    poses = actions_to_poses(actions, start, move_step=0.2, turn_step_deg=5.0)
    assert torch.equal(poses_to_actions(poses, move_step=0.2, turn_step_deg=5.0, start_c2w=start), actions)
    without_start = poses_to_actions(poses, move_step=0.2, turn_step_deg=5.0)
    assert (without_start[:, 0] == 0).all() and torch.equal(without_start[:, 1:], actions[:, 1:])

    long_actions = torch.randint(0, NUM_ACTIONS, (8, 300), generator=generator)
    poses = actions_to_poses(long_actions)
    recovered = poses_to_actions(poses, start_c2w=identity_start(8))
    assert torch.allclose(actions_to_poses(recovered), poses, atol=1e-4)
    # Recovered labels differ from the pressed ones only where pitch hit the clamp.
    differs = recovered != long_actions
    assert (split_action(recovered)[0] == split_action(long_actions)[0]).all()
    limit = math.radians(PITCH_LIMIT_DEG)
    at_limit = yaw_pitch_from_pose(poses)[1].abs() > limit - 1e-5
    assert differs.any() and at_limit[differs].all()


def test_pitch_clamp_is_a_no_op_recovered_as_no_pitch():
    pressed = parse_keys("i*15,wk")[None]
    poses = actions_to_poses(pressed)
    pitch = yaw_pitch_from_pose(poses)[1][0]
    assert math.isclose(pitch[11].item(), math.radians(60.0), abs_tol=1e-6)
    assert torch.allclose(pitch[12:15], pitch[11].expand(3), atol=1e-6)
    recovered = poses_to_actions(poses, start_c2w=identity_start(1))
    assert format_keys(recovered[0]) == "i*12,_*3,wk"
    assert torch.allclose(actions_to_poses(recovered), poses, atol=1e-6)


def test_is_free_vetoes_translation_but_keeps_rotation():
    actions = parse_keys("w*5,wj")[None]
    poses = actions_to_poses(actions, is_free=lambda positions: positions[:, 2] <= 0.31)
    assert torch.isclose(poses[0, -1, 2, 3], torch.tensor(0.3))
    assert format_keys(poses_to_actions(poses, start_c2w=identity_start(1))[0]) == "w*2,_*3,j"


def test_yaw_wraps_around():
    start = pose_from_yaw_pitch(torch.zeros(1, 3), torch.tensor([math.pi - 0.01]))
    actions = parse_keys("l*3,j*3")[None]
    poses = actions_to_poses(actions, start)
    assert torch.equal(poses_to_actions(poses, start_c2w=start), actions)


# ----------------------------------------------------------------------------- relative poses


def test_relative_poses():
    start = pose_from_yaw_pitch(torch.randn(2, 3), torch.randn(2))
    poses = actions_to_poses(parse_keys("w*3,j,l,d*2")[None].repeat(2, 1), start)
    relative = relative_poses(poses)
    assert torch.allclose(relative[:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-6)
    distances = relative[..., :3, 3].norm(dim=-1)
    assert torch.allclose(distances.amax(1), torch.ones(2))
    # Relative rotations are unchanged by the choice of world frame.
    assert torch.allclose(relative[..., :3, :3], poses[:, :1, :3, :3].transpose(-1, -2) @ poses[..., :3, :3], atol=1e-6)
    still = relative_poses(pose_from_yaw_pitch(torch.ones(1, 4, 3), torch.zeros(1, 4)))
    assert torch.allclose(still, torch.eye(4).expand(1, 4, 4, 4))


# ----------------------------------------------------------------------------- intrinsics and rays


def test_default_intrinsics():
    intrinsics = default_intrinsics(90.0, aspect=2.0, batch=3)
    assert intrinsics.shape == (3, 3, 3)
    assert torch.allclose(intrinsics[0], torch.tensor([[0.5, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]))


A, B = 0.40824829, 0.81649658  # 0.5 / sqrt(1.5) and 1 / sqrt(1.5)


def test_plucker_rays_hand_computed():
    intrinsics = default_intrinsics(90.0)  # fx = fy = 0.5, centre 0.5
    rays = plucker_rays(torch.eye(4)[None, None], intrinsics, 2, 2)
    assert rays.shape == (1, 1, 6, 2, 2)
    expected_directions = torch.tensor(
        [[[-A, -A, B], [A, -A, B]], [[-A, A, B], [A, A, B]]]  # rows v = 0, 1; columns u = 0, 1
    ).permute(2, 0, 1)
    assert torch.allclose(rays[0, 0, 3:], expected_directions, atol=1e-6)
    assert torch.allclose(rays[0, 0, :3], torch.zeros(3, 2, 2))

    # Camera at (1, 0, 0) facing +x (yaw 90 degrees): d = R d_camera, moment = o x d.
    c2w = pose_from_yaw_pitch(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(math.pi / 2))
    rays = plucker_rays(c2w[None, None], intrinsics, 2, 2)[0, 0]
    assert torch.allclose(rays[3:, 0, 0], torch.tensor([B, -A, A]), atol=1e-6)
    assert torch.allclose(rays[:3, 0, 0], torch.tensor([0.0, -A, -A]), atol=1e-6)
    assert torch.allclose(rays[3:, 0, 1], torch.tensor([B, -A, -A]), atol=1e-6)
    assert torch.allclose(rays[:3, 0, 1], torch.tensor([0.0, A, -A]), atol=1e-6)


def test_plucker_rays_unit_directions_and_orthogonal_moments():
    generator = torch.Generator().manual_seed(3)
    poses = actions_to_poses(torch.randint(0, NUM_ACTIONS, (2, 4), generator=generator))
    poses[..., :3, 3] += torch.randn(2, 4, 3, generator=generator)
    rays = plucker_rays(poses, default_intrinsics(70.0, aspect=1.5, batch=2), 6, 9)
    assert rays.shape == (2, 4, 6, 6, 9)
    moments, directions = rays[:, :, :3], rays[:, :, 3:]
    assert torch.allclose(directions.norm(dim=2), torch.ones(2, 4, 6, 9), atol=1e-6)
    assert (moments * directions).sum(2).abs().max() < 1e-5
    # The centre pixel of an odd-sized image looks along the camera's forward axis.
    centre = plucker_rays(poses, default_intrinsics(70.0, batch=2), 5, 5)[:, :, 3:, 2, 2]
    assert torch.allclose(centre, poses[..., :3, 2], atol=1e-6)
