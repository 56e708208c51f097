"""The inverse-dynamics model: its rotation hypotheses, scoring, training loop and storage."""

import pytest
import torch

from biwm.core.camera import action_label
from biwm.toyworld.idm import (IDMTrainConfig, InverseDynamicsModel, action_accuracy, chance_accuracy, find_idm, idm_key,
                           load_idm, save_idm, train_idm)
from biwm.toyworld.world import ToyWorldConfig, render_clips
from conftest import requires_gpu


def test_rotation_hypotheses_pick_the_true_turn():
    """For pure turns of a level camera, the previous frame warped by the true rotation is the
    closest of the 9 hypotheses to the current frame (the hint the network gets)."""
    cfg = ToyWorldConfig(height=32, width=32)
    model = InverseDynamicsModel(32, 32, cfg.fov_deg, cfg.turn_step_deg)
    actions = torch.arange(9).repeat_interleave(4).view(-1, 1).expand(-1, 2)  # translation none, each rotation
    clips = render_clips(list(range(36)), 2, cfg, actions=actions.contiguous())
    f = clips.frames_float()
    residual = model.inputs(f[:, 0], f[:, 1])[:, 9:18].mean(dim=(2, 3))
    assert residual.argmin(1).tolist() == (clips.camera.actions[:, 1] % 9).tolist()
    assert (clips.camera.actions[:, 1] % 9).tolist() == actions[:, 1].tolist()  # none were clamped


def test_action_accuracy_counts_labels_and_factors():
    commanded = torch.tensor([[action_label(1, 0), action_label(1, 2), action_label(0, 0), action_label(3, 3)]])
    predicted = torch.tensor([[action_label(1, 0), action_label(1, 1), action_label(2, 0), action_label(3, 3)]])
    scores = action_accuracy(predicted, commanded)
    assert scores["accuracy"] == 0.5  # first and last
    assert scores["translation_accuracy"] == 0.75 and scores["rotation_accuracy"] == 0.75
    assert scores["per_translation"]["forward"] == 1.0 and scores["per_translation"]["none"] == 0.0
    assert scores["per_translation"]["back"] is None  # never commanded
    assert scores["per_rotation"]["yaw_right"] == 0.0 and scores["per_rotation"]["none"] == 1.0
    with pytest.raises(ValueError, match="differ"):
        action_accuracy(predicted[:, :2], commanded)


def test_chance_accuracy():
    assert chance_accuracy(torch.zeros(10, dtype=torch.long)) == pytest.approx(1.0)
    assert chance_accuracy(torch.arange(81)) == pytest.approx(1 / 81)
    assert chance_accuracy(torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained():
    cfg = ToyWorldConfig(height=16, width=16)
    model, scores = train_idm(cfg, IDMTrainConfig(steps=3, batch_size=8, channels=8, pool_clips=2, clip_frames=4,
                                                  heldout_clips=3))
    return cfg, model, scores


def test_train_idm_reports_scores(trained):
    cfg, model, scores = trained
    assert scores["steps"] == 3 and scores["count"] == 3 * 3  # 3 held-out clips x 3 moves
    for key in ("accuracy", "translation_accuracy", "rotation_accuracy", "shuffled_accuracy", "chance"):
        assert 0.0 <= scores[key] <= 1.0
    labels = model.predict(render_clips([5, 6], 4, cfg).frames)
    assert labels.shape == (2, 3) and labels.dtype == torch.long and labels.min() >= 0 and labels.max() < 81


def test_idm_save_load_round_trip(trained, tmp_path, monkeypatch):
    cfg, model, _ = trained
    path = tmp_path / "idm.safetensors"
    save_idm(path, model, cfg, {"accuracy": 0.5})
    loaded = load_idm(path, cfg)
    frames = render_clips([7], 4, cfg).frames
    with torch.no_grad():  # the file stores fp16 weights
        for p in model.parameters():
            p.copy_(p.half().float())
    x = frames.float() / 127.5 - 1
    a, b = model(x[:, 0], x[:, 1]), loaded.model(x[:, 0], x[:, 1])
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert loaded.info == {"accuracy": 0.5}
    # the action policy does not matter, the rendering does
    load_idm(path, cfg.model_copy(update={"idle_prob": 0.5}))
    with pytest.raises(ValueError, match=r"differing fields fov_deg: 75.0 \(IDM\) vs 90.0 \(data\)"):
        load_idm(path, cfg.model_copy(update={"fov_deg": 90.0}))
    with pytest.raises(FileNotFoundError, match="IDM weights not found"):
        load_idm(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a biwm IDM"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_idm(tmp_path / "other.safetensors")
    # the cache is where find_idm looks
    monkeypatch.setenv("BIWM_CACHE_DIR", str(tmp_path / "cache"))
    assert find_idm(cfg) is None
    save_idm(tmp_path / "cache" / "idm" / f"idm-{idm_key(cfg)}.safetensors", model, cfg, {})
    assert find_idm(cfg) == tmp_path / "cache" / "idm" / f"idm-{idm_key(cfg)}.safetensors"


def test_idm_rejects_wrong_resolution(trained):
    _, model, _ = trained
    with pytest.raises(ValueError, match="IDM trained for 16x16 frames"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))


@requires_gpu
def test_shipped_idm_and_ssim_agree_on_cuda():
    from biwm.toyworld.idm import evaluate_idm
    from biwm.core.metrics import ssim
    from biwm.toyworld.world import split_seeds

    cfg = ToyWorldConfig(height=32, width=32)
    clips = render_clips(split_seeds("heldout", 8), 24, cfg)
    cpu = load_idm(find_idm(cfg), cfg, "cpu").model
    gpu = load_idm(find_idm(cfg), cfg, "cuda").model
    a, b = cpu.predict(clips.frames), gpu.predict(clips.frames)
    assert (a == b).float().mean() >= 0.99  # TF32 convolutions may flip a near-tie
    assert evaluate_idm(gpu, clips.frames, clips.camera.actions)["accuracy"] >= 0.9
    x, y = clips.frames[:, :4], clips.frames[:, 4:8]
    assert torch.allclose(ssim(x.cuda(), y.cuda()).cpu(), ssim(x, y), atol=1e-5)
