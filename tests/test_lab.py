"""The toy lab's training and scoring pieces: anti-aliased rendering, EMA, the learning-rate
schedule, float32 camera geometry under autocast, sharpness and per-chunk camera following."""


import pytest
import torch
from torch import nn

from biwm.core.camera import camera_rays, default_intrinsics, plucker_rays, pose_from_yaw_pitch
from biwm.core.ema import ModelEMA
from biwm.core.metrics import sharpness
from biwm.toyworld.idm import idm_key
from biwm.toyworld.world import ToyWorldConfig, render_clips


def test_supersampling_is_the_box_filtered_finer_rendering():
    fine = render_clips([3, 4], 3, ToyWorldConfig(height=32, width=32, supersample=1)).frames.float()
    coarse = render_clips([3, 4], 3, ToyWorldConfig(height=16, width=16, supersample=2)).frames.float()
    pooled = torch.nn.functional.avg_pool2d(fine.flatten(0, 1), 2).view_as(coarse)
    # the same rays, averaged before (supersample) or after (here) rounding to uint8
    assert (coarse - pooled).abs().max() <= 1.0
    plain = render_clips([3, 4], 3, ToyWorldConfig(height=16, width=16, supersample=1)).frames.float()
    assert (coarse - plain).abs().mean() > 1.0  # and it is not the aliased rendering


def test_idm_key_of_plain_rendering_is_unchanged_by_the_supersample_field():
    # the shipped IDMs were trained before the field existed: supersample 1 keeps their key
    assert idm_key(ToyWorldConfig(supersample=1)) == "18ef39a081ef"
    assert idm_key(ToyWorldConfig(supersample=4)) != idm_key(ToyWorldConfig(supersample=1))


def test_ema_follows_the_model_with_the_warm_up_decay():
    live = {"a": nn.Linear(3, 2)}
    ema = ModelEMA(live, decay=0.9)
    start = ema.shadow["a"].weight.clone()
    with torch.no_grad():
        live["a"].weight.add_(1.0)
    ema.update(live, step=0)  # decay min(0.9, 1/10) = 0.1
    expected = 0.1 * start + 0.9 * live["a"].weight
    assert torch.allclose(ema.shadow["a"].weight, expected)
    for step in range(1, 200):
        ema.update(live, step)
    assert torch.allclose(ema.shadow["a"].weight, live["a"].weight, atol=1e-6)
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(live, decay=1.0)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from biwm.core.stages.finetune import FinetuneConfig

    cfg = FinetuneConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way
    assert cfg.lr_at(110) == pytest.approx(1e-4)
    constant = FinetuneConfig(steps=110, lr=1e-3, warmup_steps=10)
    assert constant.lr_at(100) == pytest.approx(1e-3)


def test_camera_geometry_stays_float32_under_autocast():
    c2w = pose_from_yaw_pitch(torch.tensor([0.3]), torch.tensor([0.1]))[:, None].expand(1, 2, 4, 4).clone()
    c2w[..., :3, 3] = torch.tensor([0.5, -1.2, 0.7])
    k = default_intrinsics(75.0, 1.0, 1)
    plain = plucker_rays(c2w, k, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        _, dirs = camera_rays(c2w, k, 8, 8)
        auto = plucker_rays(c2w, k, 8, 8)
    assert dirs.dtype == torch.float32 and auto.dtype == torch.float32
    assert torch.equal(plain, auto)


def test_sharpness_is_one_for_the_truth_below_for_blur_above_for_noise():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1
    assert sharpness(truth, truth) == pytest.approx(1.0)
    blurred = torch.nn.functional.avg_pool2d(truth.flatten(0, 1), 3, 1, 1).view_as(truth)
    assert sharpness(blurred, truth) < 0.5
    noisy = (truth + 0.5 * torch.randn(truth.shape, generator=g)).clamp(-1, 1)
    assert sharpness(noisy, truth) > 1.1
    as_uint8 = ((truth + 1) * 127.5).round().to(torch.uint8)
    assert sharpness(as_uint8, truth) == pytest.approx(1.0, abs=0.01)


def test_camera_scores_per_chunk_and_last_five():
    from biwm.core.camera import CameraTrack
    from biwm.toyworld.scores import camera_scores

    class Fixed:
        def __init__(self, labels):
            self.labels = labels

        def predict(self, frames):
            return self.labels

    b, chunks, per = 2, 6, 2
    actions = torch.zeros(b, 1 + chunks * per, dtype=torch.long)
    predicted = torch.zeros(b, chunks * per, dtype=torch.long)
    predicted[:, :per] = 5  # the first chunk is wrong, the rest right
    predicted[0, -1] = 7  # one frame wrong in the last chunk
    c2w = torch.eye(4).expand(b, actions.shape[1], 4, 4).clone()
    track = CameraTrack(c2w, default_intrinsics(75.0, 1.0, b), actions)
    out = camera_scores(Fixed(predicted), torch.zeros(b, 1 + chunks * per, 3, 8, 8), track, 1, ToyWorldConfig(),
                        frames_per_chunk=per)
    assert out["accuracy_per_chunk"] == pytest.approx([0.0, 1, 1, 1, 1, 0.75])
    assert out["accuracy_last5"] == pytest.approx((4 + 0.75) / 5)
    assert out["accuracy"] == pytest.approx((chunks * per * b - per * b - 1) / (chunks * per * b))


def test_strip_labels_rows_and_columns(tmp_path):
    from PIL import Image

    from biwm.core.video import write_strip

    rows = [torch.zeros(6, 3, 8, 8, dtype=torch.uint8), torch.full((6, 3, 8, 8), 255, dtype=torch.uint8)]
    write_strip(tmp_path / "plain.png", rows, every=2, scale=2)
    write_strip(tmp_path / "named.png", rows, every=2, scale=2, labels=["truth", "generated"], history=2)
    plain = Image.open(tmp_path / "plain.png")
    named = Image.open(tmp_path / "named.png")
    assert plain.size == (3 * 16, 2 * 16)
    assert named.size[0] > plain.size[0] and named.size[1] > plain.size[1]  # a margin on the left and on top
    margin = torch.tensor(list(named.getdata()), dtype=torch.int32).view(named.size[1], named.size[0], 3)
    left = named.size[0] - plain.size[0]
    assert (margin[:, :left] < 128).any()  # the row names are drawn
    assert (margin[-plain.size[1]:, left:] == torch.tensor(list(plain.getdata())).view(32, 48, 3)).all()
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        write_strip(tmp_path / "bad.png", rows, labels=["truth"])
    assert not (tmp_path / "bad.png").exists()


def test_rollout_session_one_chunk_at_a_time_equals_the_whole_rollout():
    from biwm.core.rollout import rollout
    from biwm.core.sampling import RolloutSession, Sampler, student_sigmas
    from test_model import activate_controls, random_camera, tiny_world

    world = tiny_world()
    activate_controls(world, 0.05)
    text = world.backbone.encode_text(["", ""])
    null = world.backbone.encode_text([""])
    history = torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    camera = random_camera(2, 2 + 3 * 2, seed=1)
    for sampler in (Sampler(3, 3.0, 2.0), Sampler(2, 5.0, student=True)):
        whole = rollout(world, text, null, history, camera, 3, 2, sampler.steps, sampler.shift, sampler.cfg_scale,
                        torch.Generator().manual_seed(0),
                        student_sigmas=student_sigmas(2, 5.0) if sampler.student else None)
        session = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, 2)),
                                 torch.Generator().manual_seed(0), chunk_frames=2)
        pieces = [session.step(camera.frames(slice(2 + 2 * c, 4 + 2 * c))) for c in range(3)]
        assert torch.equal(torch.cat(pieces, 2), whole)
        assert session.frames == 8 and torch.equal(session.history[:, :, 2:], whole)
    with pytest.raises(ValueError, match="the chunk's camera has 4 video frames, expected 2"):
        session.step(camera.frames(slice(0, 4)))
    with pytest.raises(ValueError, match="give a camera exactly when"):
        session.step(None)
    with pytest.raises(ValueError, match="covers 3 video frames, the history 2 latent frames"):
        RolloutSession(world, text, null, history, Sampler(), camera.frames(slice(0, 3)))


def test_a_model_file_alone_loads_and_evaluates_through_its_card(tmp_path):
    import shutil

    from typer.testing import CliRunner

    import biwm.core as biwm
    from biwm.core.cli import app
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunNotFound, find_run, run_recipe
    from biwm.core.sampling import RolloutSession
    from biwm.core.stages.common import read_card
    from conftest import tiny_recipe

    data = tiny_recipe(tmp_path / "run")
    data["stages"] = data["stages"][:1]
    run_recipe(validate_recipe(data))
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(tmp_path / "run" / "finetune" / "model.safetensors", alone / "model.safetensors")
    card = read_card(alone / "model.safetensors")
    assert card["stage"] == "finetune" and card["model"]["backbone"]["options"]["overrides"] == {"num_layers": 2}

    world, sampler = biwm.load(alone)
    assert sampler.steps == 20 and not sampler.student and not world.training
    trained = biwm.load(tmp_path / "run")[0]  # the same model through its run's recipe.yaml
    for (name, a), (_, b) in zip(world.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), name
    text = world.backbone.encode_text(["", ""])
    session = RolloutSession(world, text, world.backbone.encode_text([""]), torch.zeros(2, 48, 0, 8, 8),
                             type(sampler)(2, 3.0), None, chunk_frames=2)
    assert session.step().shape == (2, 48, 2, 8, 8)

    result = CliRunner().invoke(app, ["eval", str(alone / "model.safetensors"), "--set", "evaluate.trajectories=2",
                                      "--set", "evaluate.chunks=1", "--set", "evaluate.steps=2",
                                      "--set", "evaluate.history_frames=2", "--set", "evaluate.chunk_frames=2",
                                      "--set", "evaluate.dynamics_scenes=0", "--set", "evaluate.idm_steps=1"])
    assert result.exit_code == 0, result.output[-2000:]
    assert "psnr_per_chunk" in __import__("json").loads((alone / "eval" / "metrics.json").read_text())

    from safetensors.torch import load_file, save_file

    save_file(load_file(str(alone / "model.safetensors")), str(tmp_path / "bare.safetensors"))  # no card
    with pytest.raises(RunNotFound, match="no recipe.yaml"):
        find_run(tmp_path / "bare.safetensors")


def test_a_teacher_card_carries_its_recipes_evaluate_sampler(tmp_path):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.core.stages.common import model_card, recipe_data_from_card
    from conftest import tiny_recipe

    data = tiny_recipe(tmp_path / "run")
    data["stages"] = [data["stages"][0], {"stage": "evaluate", "steps": 7, "shift": 1.5, "cfg_scale": 2.0}]
    ctx = RunContext(validate_recipe(data), tmp_path / "run")
    card = __import__("json").loads(next(iter(model_card(ctx, "finetune").values())))
    assert card["sampler"] == {"steps": 7, "shift": 1.5, "cfg_scale": 2.0, "history_sigma": 0.0}
    evaluate = recipe_data_from_card(card, tmp_path, tmp_path / "m.safetensors")["stages"][0]
    assert (evaluate["steps"], evaluate["shift"], evaluate["cfg_scale"]) == (7, 1.5, 2.0)
    student = {**card, "sampler": {"steps": 4, "shift": 5.0, "student": True}}
    assert "shift" not in recipe_data_from_card(student, tmp_path, tmp_path / "m.safetensors")["stages"][0]
    data["stages"] = data["stages"][:1]
    no_evaluate = __import__("json").loads(next(iter(model_card(RunContext(validate_recipe(data), tmp_path / "r"),
                                                                "finetune").values())))
    assert no_evaluate["sampler"] == {}


def test_toy_lab_report_keeps_the_issue_keys_and_names_a_file_without_them(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    keys = ["trajectories", "psnr_per_chunk", "copy_last_frame_psnr_per_chunk", "idm_accuracy", "idm_accuracy_last5",
            "dynamics", "sharpness", "nfe_per_chunk", "sampler", "idm_accuracy_true_clips", "idm_chance"]
    teacher = {k: i for i, k in enumerate(keys)} | {"psnr": 1.0}
    (tmp_path / "t.json").write_text(json.dumps({"stages": {"evaluate": teacher}}))  # a run's merged metrics
    (tmp_path / "s.json").write_text(json.dumps({k: 2 * i for i, k in enumerate(keys)}))  # a biwm eval's
    script = [sys.executable, str(ROOT / "scripts" / "toy_lab_report.py")]
    out = tmp_path / "toy_lab.json"
    done = subprocess.run(script + [str(tmp_path / "t.json"), str(tmp_path / "s.json"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc == {"teacher": {k: i for i, k in enumerate(keys)}, "student": {k: 2 * i for i, k in enumerate(keys)}}
    (tmp_path / "bad.json").write_text(json.dumps({"psnr": 1.0}))
    failed = subprocess.run(script + [str(tmp_path / "bad.json"), str(tmp_path / "s.json"), "--out",
                                      str(tmp_path / "x.json")], capture_output=True, text=True)
    assert failed.returncode != 0 and "bad.json: not an evaluation" in failed.stderr
    assert not (tmp_path / "x.json").exists()


def test_ship_model_halves_the_file_and_keeps_a_loadable_card(tmp_path):
    import subprocess
    import sys

    import biwm.core as biwm
    from conftest import ROOT, tiny_model_file

    src = tiny_model_file(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(src), str(tmp_path / "ship"),
                           "--teacher", str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shipped = tmp_path / "ship" / "model.safetensors"
    assert shipped.stat().st_size < 0.6 * src.stat().st_size
    world, _ = biwm.load(shipped)
    original, _ = biwm.load(src)
    for (name, a), (_, b) in zip(world.state_dict().items(), original.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b.to(torch.bfloat16).to(b.dtype)), name
    from biwm.core.checkpoint import read_metadata

    assert read_metadata(shipped)["teacher"] == "../run/finetune/model.safetensors"

    # --sampler sets a teacher's card sampler, which biwm.core.load then samples with
    ship = [sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(src), str(tmp_path / "cfg")]
    done = subprocess.run(ship + ["--sampler", "12:1.5:2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _, sampler = biwm.load(tmp_path / "cfg" / "model.safetensors")
    assert (sampler.steps, sampler.cfg_scale, sampler.shift, sampler.student) == (12, 1.5, 2.0, False)
    assert sampler.history_sigma == 0.0
    done = subprocess.run(ship[:-1] + [str(tmp_path / "noised"), "--sampler", "12:1.5:2:0.1"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    _, sampler = biwm.load(tmp_path / "noised" / "model.safetensors")
    assert (sampler.steps, sampler.history_sigma) == (12, 0.1) and "history noised to 0.1" in sampler.describe()
    for spec, message in (("12:1.5", "--sampler: expected STEPS:CFG:SHIFT"),
                          ("12:1.5:2:1.5", "history sigma in [0, 1)")):
        bad = subprocess.run(ship[:-1] + [str(tmp_path / "bad"), "--sampler", spec], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr, spec
        assert not (tmp_path / "bad").exists()
