"""``biwm generate MODEL --keys | --poses``: the toy-lab student driven by a key string follows the
turn the way the true toy world does; a pose file replays a trajectory; keys that do not cover whole
chunks are errors that say so; a history video starts the drive."""

from __future__ import annotations

import json
import subprocess

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest import ROOT, biwm_cmd, image_shift, subprocess_env, true_turn_shift

STUDENT = str(ROOT / "examples" / "weights" / "toyworld-student")


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*biwm_cmd(), "generate", *args], capture_output=True, text=True,
                          env=subprocess_env(COLUMNS="200"), timeout=600)


def frames_of(mp4) -> np.ndarray:
    """[T, H, W] gray frames, scaled back down from the 4x upscaled mp4."""
    video = np.stack(imageio.mimread(str(mp4))).astype(np.float64).mean(-1)
    t, h, w = video.shape
    return video.reshape(t, h // 4, 4, w // 4, 4).mean((2, 4))


@pytest.mark.parametrize("count, chunks, message", [
    (5, None, "--keys give 5 frames, not a whole number of chunks of 4 frames; give 4 or 8"),
    (3, None, "--keys give 3 frames, not a whole number of chunks of 4 frames; give 4 (nothing"),
    (8, 1, "--keys give 8 frames, but 1 chunks of 4 frames need 4; give exactly 4"),
])
def test_keys_that_do_not_cover_the_rollout_are_errors_that_say_so(count, chunks, message):
    from biwm.core.driving import DriveError, chunked

    with pytest.raises(DriveError) as info:
        chunked(count, 4, chunks, "--keys")
    assert message in str(info.value)
    assert chunked(8, 4, None, "--keys") == 2 and chunked(8, 4, 2, "--keys") == 2


def test_keys_errors_exit_2_with_the_message():
    for keys, message in [("l*5", "--keys give 5 frames, not a whole number of chunks of 4 frames; give 4 or 8"),
                          ("q*4", "unknown key 'q'"), ("l*99999999999999", "at most 100000")]:
        proc = generate(STUDENT, "--keys", keys, "--out", "/nonexistent/never.mp4")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_usage_errors_name_the_option():
    for args, message in [((), "give exactly one of --keys and --poses"),
                          (("--keys", "w*4", "--poses", "p.json"), "give exactly one of --keys and --poses"),
                          (("--keys", "w*4", "--scene", "1", "--history", "v.mp4"), "at most one of --history"),
                          (("--poses", "/nonexistent/p.json"), "--poses: /nonexistent/p.json: no such file")]:
        proc = generate(STUDENT, *args, "--out", "/tmp/biwm-never.mp4")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert generate(STUDENT, "--keys", "w*4", "--out", "x.gif").stderr.count("must end in .mp4") == 1


def test_generate_follows_the_turn_like_the_toy_world_and_replays_its_poses(tmp_path):
    out = tmp_path / "turn.mp4"
    proc = generate(STUDENT, "--keys", "l*4", "--scene", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    trajectory = json.loads(out.with_suffix(".json").read_text())
    assert trajectory["keys"] == "l*4" and trajectory["start"] == "held-out scene 0 of toyworld"
    assert (tmp_path / "turn_strip.png").is_file()
    gray = frames_of(out)
    assert gray.shape == (8, 32, 32)  # 4 true history frames, then the chunk
    model = [image_shift(gray[i], gray[i + 1])[1] for i in range(3, 7)]
    truth = [dx for _, dx in true_turn_shift(0, 4, "l*4")]
    # turning right moves the room left in the true world (about 2 px a frame); the model's frames too
    assert np.mean(truth) <= -1.5 and np.mean(model) <= -1.0 and np.sign(np.mean(model)) == np.sign(np.mean(truth))

    # the trajectory file replays as --poses: the same actions, and the same frames up to mp4 noise
    replay = tmp_path / "replay.mp4"
    proc = generate(STUDENT, "--poses", str(out.with_suffix(".json")), "--out", str(replay))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(replay.with_suffix(".json").read_text())["actions"] == trajectory["actions"]
    assert np.abs(frames_of(replay) - gray).max() < 8

    # the written mp4 (4x upscaled) as history: its last 4 frames start a new drive
    onward = tmp_path / "onward.mp4"
    proc = generate(STUDENT, "--keys", "_*4", "--history", str(out), "--out", str(onward))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(onward.with_suffix(".json").read_text())["start"] == str(out)
    onward_gray = frames_of(onward)
    assert np.abs(onward_gray[:4] - gray[4:]).mean() < 6  # the history is the previous chunk's frames
