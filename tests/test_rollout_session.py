"""One rollout session API (biwm.core.sampling.RolloutSession): stepped one chunk at a time it gives
exactly what a whole-trajectory rollout gives, its frames are the decode of its latents continuing
the history, its timings mark every chunk and every forward, and it applies its speed options once."""

from __future__ import annotations

import pytest
import torch

from biwm.core.sampling import RolloutSession, Sampler
from biwm.core.speed import SpeedOptions, elapsed
from biwm.core.video import as_uint8

SAMPLERS = {"teacher with CFG": Sampler(3, 3.0, 2.0), "student": Sampler(2, 5.0, student=True)}


def rollout_inputs(batch: int = 2, history_frames: int = 2, chunks: int = 3, chunk_frames: int = 2):
    """A tiny world with active controls, its text, null text, random history and a camera over
    history + chunks (the tiny pixel codec has one video frame per latent frame)."""
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    text = world.backbone.encode_text([""] * batch)
    null = world.backbone.encode_text([""])
    history = torch.randn(batch, 48, history_frames, 8, 8, generator=torch.Generator().manual_seed(3))
    camera = random_camera(batch, history_frames + chunks * chunk_frames, seed=1)
    return world, text, null, history, camera


class RunningDecoder:
    """A causal stand-in for a streaming VAE decoder: each frame depends on the latent frame before
    it, so frames continue the history only if the decoder has seen the history first."""

    def __init__(self, backbone):
        self.backbone, self.last = backbone, None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        last = torch.zeros_like(latents[:, :, :1]) if self.last is None else self.last
        before = torch.cat([last, latents[:, :, :-1]], 2)
        self.last = latents[:, :, -1:]
        return self.backbone.decode_video(latents - before)


@pytest.mark.parametrize("name", SAMPLERS)
def test_stepping_one_chunk_at_a_time_gives_the_whole_rollouts_latents_and_their_decode(name, monkeypatch):
    from biwm.core.rollout import rollout

    sampler = SAMPLERS[name]
    world, text, null, history, camera = rollout_inputs()
    bb = world.backbone
    monkeypatch.setattr(bb, "stream_decoder", lambda: RunningDecoder(bb), raising=False)
    whole = rollout(world, text, null, history, camera, 3, 2, 0, 0.0, generator=torch.Generator().manual_seed(0),
                    sampler=sampler)

    session = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, 2)),
                             torch.Generator().manual_seed(0), chunk_frames=2, decode=True)
    latents, frames = [], []
    for c in range(3):
        latents.append(session.step(camera.frames(slice(2 + 2 * c, 4 + 2 * c))))
        got = session.ready()  # inline decode: this chunk's frames, at once
        assert len(got) == 1 and got[0].shape == (2, 2, 32, 32, 3) and got[0].dtype == torch.uint8
        frames += got
    assert session.finish() == [] and session.timings is None
    assert torch.equal(torch.cat(latents, 2), whole)

    # the frames continue the history: decoding history + generated latents afterwards, in one go
    decoded = RunningDecoder(bb).decode(torch.cat([history, whole], 2))[:, :, 2:]
    assert torch.equal(torch.cat(frames, 1), as_uint8(decoded).permute(0, 2, 3, 4, 1))


def test_rollout_video_is_the_float_decode_of_the_rollout():
    from biwm.core.evaluation import rollout_video
    from biwm.core.rollout import rollout

    world, text, null, history, camera = rollout_inputs()
    sampler = SAMPLERS["teacher with CFG"]
    seen = []
    video = rollout_video(world, text, null, history, camera, 3, 2, sampler, 0, "bidirectional", on_chunk=seen.append)
    latents = rollout(world, text, null, history, camera, 3, 2, 0, 0.0, generator=torch.Generator().manual_seed(0),
                      sampler=sampler)
    expected = world.backbone.decode_video(torch.cat([history, latents], 2))[:, :, 2:].transpose(1, 2)
    assert seen == [0, 1, 2] and video.shape == (2, 6, 3, 32, 32) and video.dtype == torch.float32
    assert torch.equal(video, expected)


@pytest.mark.parametrize("name", SAMPLERS)
def test_timings_mark_each_chunk_and_each_forward_in_order(name):
    sampler = SAMPLERS[name]
    world, text, null, history, camera = rollout_inputs()
    calls = []
    forward = world.forward
    world.forward = lambda window: calls.append(window.chunk.shape[0]) or forward(window)
    session = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, 2)),
                             torch.Generator().manual_seed(0), chunk_frames=2, decode=True, timing=True)
    session.run(3, camera.frames(slice(2, None)))
    assert len(session.timings) == 3 and len(calls) == 3 * sampler.steps
    # one forward per denoising step: a guided step is one forward of the doubled batch
    assert set(calls) == {4 if sampler.cfg_scale != 1.0 and not sampler.student else 2}
    for t in session.timings:
        assert len(t.forwards) == sampler.steps
        marks = [t.start, t.sample[0], *[m for span in t.forwards for m in span], t.sample[1], *t.decode, t.ready]
        assert marks == sorted(marks)  # CPU: perf_counter seconds, one after the other
        assert elapsed(*t.sample) >= sum(elapsed(a, b) for a, b in t.forwards) > 0
    assert not world._forward_hooks and not world._forward_pre_hooks  # held only while a chunk is sampled


def test_speed_options_convert_the_model_once_and_frames_need_decode(monkeypatch):
    world, text, null, history, camera = rollout_inputs()
    kernels = []
    monkeypatch.setattr(world.backbone, "set_attention_kernel", kernels.append, raising=False)

    def open_session(speed):
        return RolloutSession(world, text, null, history, Sampler(2, 3.0), camera.frames(slice(0, 2)),
                              torch.Generator().manual_seed(0), chunk_frames=2, speed=speed)

    plain = open_session(None).step(camera.frames(slice(2, 4)))
    session = open_session(SpeedOptions(attention="math"))
    open_session(SpeedOptions(attention="math", overlap_decode=False))  # how frames are decoded converts nothing
    assert kernels == ["math"] and session.speed.attention == "math"
    assert torch.equal(session.step(camera.frames(slice(2, 4))), plain)  # the spy converts nothing
    open_session(SpeedOptions())
    assert kernels == ["math", "auto"]
    with pytest.raises(ValueError, match="open the session with decode=True"):
        session.ready()


def test_a_step_may_take_keys_integrated_from_the_last_pose():
    """Interactive play drives a session with action labels: a step given keys equals a step given
    the poses those keys integrate to from the session's last pose."""
    from biwm.core.camera import CameraTrack, actions_to_poses

    world, text, null, history, camera = rollout_inputs(chunks=2)
    keys = torch.tensor([[1, 1], [40, 0]])  # two frames of one action each per clip (tiny codec: tf = 1)
    sessions = [RolloutSession(world, text, null, history, SAMPLERS["teacher with CFG"], camera.frames(slice(0, 2)),
                               torch.Generator().manual_seed(0), chunk_frames=2) for _ in range(2)]
    by_keys = sessions[0].step(keys)
    poses = actions_to_poses(keys, camera.c2w[:, 1])
    assert not torch.allclose(poses[0, -1], camera.c2w[0, 1])  # the keys move the camera from its last pose
    by_poses = sessions[1].step(CameraTrack(poses, camera.intrinsics, keys))
    assert torch.equal(by_keys, by_poses)
    assert torch.equal(sessions[0].camera.c2w, sessions[1].camera.c2w)
    assert torch.equal(sessions[0].camera.actions[:, 2:], keys)
    with pytest.raises(ValueError, match=r"action labels must be integers \[B, K\*tf\] = \[2, 2\]"):
        sessions[0].step(torch.zeros(2, 3, dtype=torch.long))


def test_a_session_opened_from_a_prompt_string_equals_one_given_its_embeddings():
    """RolloutSession.from_prompt encodes the prompt for every clip and the empty prompt for guidance:
    it samples exactly what a session given those embeddings samples, and defaults to Sampler()."""
    world, _, _, history, camera = rollout_inputs()
    bb = world.backbone
    text, null = bb.encode_text(["a red room"]).expand(2), bb.encode_text([""])
    assert not torch.equal(text["t5"].embeds[:1], null["t5"].embeds)  # the prompt is not the empty prompt
    sampler = SAMPLERS["teacher with CFG"]
    by_prompt = RolloutSession.from_prompt(world, history, "a red room", sampler, camera.frames(slice(0, 2)),
                                           generator=torch.Generator().manual_seed(0), chunk_frames=2)
    by_tensors = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, 2)),
                                torch.Generator().manual_seed(0), chunk_frames=2)
    assert by_prompt.text.batch_size == 2
    chunk = camera.frames(slice(2, 4))
    assert torch.equal(by_prompt.step(chunk), by_tensors.step(chunk))
    assert RolloutSession.from_prompt(world, history, camera=camera.frames(slice(0, 2))).sampler == Sampler()
    with pytest.raises(TypeError, match="prompt must be a str, got list"):
        RolloutSession.from_prompt(world, history, ["a room"])
