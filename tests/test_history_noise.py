"""Noise augmentation of the history: the window carries the history's noise level, the model sees
it as the history tokens' timestep, training draws it, samplers and the student apply it, and model
files carry it in their card."""

import pytest
import torch

from biwm.core.sampling import RolloutSession, Sampler, guided_velocity
from biwm.core.schedule import timestep
from biwm.core.window import Window, noise_history


def _window(world, batch=2, history_frames=2, seed=0):
    from test_model import random_camera

    g = torch.Generator().manual_seed(seed)
    text = world.backbone.encode_text([""] * batch)
    return Window(text=text, chunk=torch.randn(batch, 48, 2, 8, 8, generator=g), timestep=torch.full((batch,), 500.0),
                  history=torch.randn(batch, 48, history_frames, 8, 8, generator=g),
                  camera=random_camera(batch, history_frames + 2, seed=seed))


def _timesteps_seen(world, window):
    """The per-token timesteps the backbone's blocks get for ``window``."""
    seen = []
    run_blocks = world.backbone.run_blocks

    def spy(tokens, timesteps, *args, **kwargs):
        seen.append(timesteps.clone())
        return run_blocks(tokens, timesteps, *args, **kwargs)

    world.backbone.run_blocks = spy
    try:
        out = world(window)
    finally:
        del world.backbone.run_blocks
    return seen[0], out


def test_noise_history_mixes_with_the_noise_and_the_model_sees_the_level():
    from test_model import activate_controls, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    window = _window(world)
    noise = torch.randn_like(window.history)
    noised = noise_history(window, torch.tensor([0.2, 0.5]), noise)
    expected = torch.stack([0.8 * window.history[0] + 0.2 * noise[0], 0.5 * window.history[1] + 0.5 * noise[1]])
    assert torch.allclose(noised.history, expected, atol=1e-6)
    assert torch.equal(noised.history_sigma, torch.tensor([0.2, 0.5]))
    assert window.history_sigma is None  # the original window is left as it was

    clean_t, clean_out = _timesteps_seen(world, window)
    noised_t, noised_out = _timesteps_seen(world, noised)
    tokens_per_frame = 8 * 8 // 4  # tiny preset: 2x2 patches on an 8x8 latent
    n_hist = 2 * tokens_per_frame
    assert clean_t.shape == noised_t.shape == (2, n_hist + 2 * tokens_per_frame)
    assert world.last_window_tokens == n_hist + 2 * tokens_per_frame  # what the blocks saw, told without a spy
    assert torch.equal(clean_t[:, :n_hist], torch.zeros(2, n_hist))
    assert torch.allclose(noised_t[:, :n_hist], timestep(torch.tensor([0.2, 0.5]))[:, None].expand(2, n_hist))
    assert torch.equal(noised_t[:, n_hist:], clean_t[:, n_hist:])  # the chunk keeps its own timestep
    # telling the model the level changes its prediction for the same noised history
    untold = Window(**{**noised.__dict__, "history_sigma": None})
    assert not torch.allclose(world(untold), noised_out)
    # a zero level is the clean window; a window without history is left alone
    zero = noise_history(window, 0.0, noise)
    assert torch.equal(zero.history, window.history) and torch.allclose(world(zero), clean_out, atol=1e-6)
    empty = Window(text=window.text, chunk=window.chunk, timestep=window.timestep)
    assert noise_history(empty, 0.3, noise) is empty


def test_guidance_keeps_the_history_level_in_both_halves():
    from test_model import activate_controls, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    window = noise_history(_window(world), torch.tensor([0.1, 0.4]), torch.randn(2, 48, 2, 8, 8))
    levels = []
    forward = world.forward

    def spy(w):
        levels.append(w.history_sigma)
        return forward(w)

    world.forward = spy
    null = world.backbone.encode_text([""])
    guided_velocity(world, window, null, 2.0)
    assert torch.equal(levels[0], torch.tensor([0.1, 0.4, 0.1, 0.4]))


def test_samplers_noise_the_history_once_per_chunk_from_the_generator():
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    seen = []
    forward = world.forward

    def spy(w):
        seen.append((w.history.clone(), None if w.history_sigma is None else w.history_sigma.clone()))
        return forward(w)

    world.forward = spy
    text = world.backbone.encode_text(["", ""])
    null = world.backbone.encode_text([""])
    history = torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    camera = random_camera(2, 2 + 2 * 2, seed=1)
    for sampler in (Sampler(3, 3.0, 1.0, history_sigma=0.25), Sampler(2, 5.0, student=True, history_sigma=0.25)):
        seen.clear()
        session = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, 2)),
                                 torch.Generator().manual_seed(0), chunk_frames=2)
        first = session.step(camera.frames(slice(2, 4)))
        calls = len(seen)
        assert calls == sampler.steps
        # every step of the chunk sees the same noised history, at level 0.25, not the clean one
        assert all(torch.equal(h, seen[0][0]) and torch.equal(s, torch.full((2,), 0.25)) for h, s in seen)
        residual = (seen[0][0] - 0.75 * history) / 0.25  # the noise that was mixed in: unit variance
        assert 0.8 < float(residual.std()) < 1.2
        session.step(camera.frames(slice(4, 6)))  # the next chunk: fresh noise on the grown history
        assert seen[calls][0].shape[2] == 4 and torch.equal(session.history[:, :, :2], history)
        assert not torch.allclose(seen[calls][0][:, :, 2:], 0.75 * first, atol=1e-3)
    clean = RolloutSession(world, text, null, history, Sampler(3, 3.0, 1.0), camera.frames(slice(0, 2)),
                           torch.Generator().manual_seed(0), chunk_frames=2)
    seen.clear()
    clean.step(camera.frames(slice(2, 4)))
    assert all(s is None and torch.equal(h, history) for h, s in seen)
    assert "history noised to 0.25" in Sampler(history_sigma=0.25).describe()


def test_finetune_draws_a_history_level_per_sample_within_the_maximum():
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world()
    activate_controls(world, 0.05)
    windows = []
    forward = world.forward

    def spy(w):
        windows.append(w)
        return forward(w)

    world.forward = spy
    text = world.backbone.encode_text([""] * 8)
    g = torch.Generator().manual_seed(0)
    x0, history = torch.randn(8, 48, 2, 8, 8, generator=g), torch.randn(8, 48, 2, 8, 8, generator=g)
    camera = random_camera(8, 4, seed=2)
    cfg = FinetuneConfig(history_sigma_max=0.3, text_dropout=0.0, control_dropout=0.0)
    loss = finetune_loss(world, cfg, x0, history, camera, text, text.select(0), torch.Generator().manual_seed(1),
                         "bidirectional")
    loss.backward()
    level = windows[0].history_sigma
    assert level.shape == (8,) and bool((level >= 0).all() and (level <= 0.3).all()) and float(level.std()) > 0
    mixed = (windows[0].history - (1 - level.view(-1, 1, 1, 1, 1)) * history) / level.view(-1, 1, 1, 1, 1)
    assert 0.8 < float(mixed.std()) < 1.2
    # the timestep embedding, which now also carries the history's level, gets gradients
    assert world.backbone.transformer.condition_embedder.time_embedder.linear_1.weight.grad.abs().sum() > 0
    windows.clear()
    finetune_loss(world, FinetuneConfig(), x0, history, camera, text, text.select(0), torch.Generator().manual_seed(1),
                  "bidirectional")
    assert windows[0].history_sigma is None and torch.equal(windows[0].history, history)
    with pytest.raises(ValueError, match="history_sigma_max"):
        FinetuneConfig(history_sigma_max=1.5)


def test_student_self_rollout_judges_chunks_in_the_noised_window():
    from biwm.core.dmd import self_rollout
    from biwm.core.sampling import student_sigmas
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    text = world.backbone.encode_text(["", ""])
    history = torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    camera = random_camera(2, 2 + 2 * 2, seed=3)
    with torch.no_grad():
        rolled = self_rollout(world, text, history, camera, 2, 2, student_sigmas(2, 5.0), torch.Generator().manual_seed(0),
                              history_sigma=0.2)
        clean = self_rollout(world, text, history, camera, 2, 2, student_sigmas(2, 5.0), torch.Generator().manual_seed(0))
    for chunk in rolled:
        assert torch.equal(chunk.window.history_sigma, torch.full((2,), 0.2))
    assert not torch.allclose(rolled[0].window.history, history)
    assert all(c.window.history_sigma is None for c in clean)
    assert torch.equal(clean[0].window.history, history)


def test_a_student_distilled_with_history_noise_samples_with_it(tmp_path):
    import biwm.core as biwm
    from biwm.core.checkpoint import read_metadata
    from test_distill import distill_recipe, run

    run(distill_recipe(tmp_path / "run", steps=2, history_sigma=0.2))
    weights = tmp_path / "run" / "distill" / "model.safetensors"
    assert read_metadata(weights)["student_history_sigma"] == "0.2"
    _, sampler = biwm.load(weights)
    assert sampler.student and sampler.history_sigma == 0.2


def test_rollout_video_samples_with_the_whole_sampler():
    """``rollout_video`` (``biwm eval``, ``generate``, the lab probe) hands its Sampler on whole: its
    history level and a student's explicit schedule take effect rather than being rebuilt away."""
    from biwm.core.evaluation import rollout_video
    from biwm.core.sampling import student_sigmas
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world().eval()
    activate_controls(world, 0.05)
    levels = []
    forward = world.forward

    def spy(w):
        levels.append(None if w.history_sigma is None else float(w.history_sigma[0]))
        return forward(w)

    world.forward = spy
    text = world.backbone.encode_text(["", ""])
    null = world.backbone.encode_text([""])
    history = torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    camera = random_camera(2, 1 + world.backbone.temporal_factor * 5, seed=1)  # video rate: 2 history + 2x2 chunk

    def video(sampler):
        levels.clear()
        return rollout_video(world, text, null, history, camera, 2, 2, sampler, 0, "bidirectional")

    clean = video(Sampler(2, 3.0, 1.0))
    assert levels == [None] * 4
    noised = video(Sampler(2, 3.0, 1.0, history_sigma=0.3))
    assert levels == [pytest.approx(0.3)] * 4 and not torch.allclose(noised, clean)
    a = video(Sampler(2, 3.0, student=True, student_schedule=torch.tensor([1.0, 0.4])))
    assert levels and all(level is None for level in levels)
    b = video(Sampler(2, 3.0, student=True, student_schedule=student_sigmas(2, 3.0)))
    assert not torch.allclose(a, b)  # the explicit schedule is the one used
