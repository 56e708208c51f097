"""Evaluation: scores against ground truth with a perfect judge, the evaluate stage, biwm eval and
biwm compare."""

import json
import subprocess

import pytest

from conftest import biwm_cmd, subprocess_env, tiny_recipe


class OracleIDM:
    """Stands in for the IDM: 'predicts' the labels it is given."""

    def __init__(self, labels):
        self.labels = labels

    def predict(self, frames):
        assert frames.shape[1] == self.labels.shape[1] + 1
        return self.labels


def test_camera_scores_with_a_perfect_and_a_wrong_judge():
    from biwm.toyworld.scores import camera_scores
    from biwm.toyworld.world import ToyWorldConfig, render_clips

    cfg = ToyWorldConfig(height=16, width=16)
    clips = render_clips([3, 4], 10, cfg)
    start = 4
    commanded = clips.camera.actions[:, start:]
    perfect = camera_scores(OracleIDM(commanded), clips.frames[:, start - 1:], clips.camera, start, cfg)
    assert perfect["accuracy"] == 1.0
    # the realised actions integrate back to the commanded poses exactly
    assert perfect["rotation_error_deg"] < 1e-2 and perfect["translation_error"] < 1e-4
    turned = commanded.clone()
    turned[:, 0] = 2  # yaw right instead, on the first move, translation none
    wrong = camera_scores(OracleIDM(turned), clips.frames[:, start - 1:], clips.camera, start, cfg)
    assert wrong["accuracy"] < 1.0 and wrong["rotation_error_deg"] > 1.0


def test_still_camera_clips_move_only_their_boxes():
    from biwm.toyworld.scores import still_camera_clips
    from biwm.core.metrics import motion
    from biwm.toyworld.world import ToyWorldConfig

    cfg = ToyWorldConfig(height=32, width=32, max_speed=0.3)
    clips = still_camera_clips(3, 5, cfg)
    assert (clips.camera.c2w == clips.camera.c2w[:, :1]).all() and (clips.camera.actions == 0).all()
    assert motion(clips.frames).mean() > 0
    frozen = still_camera_clips(3, 5, cfg.model_copy(update={"num_moving": 0}))
    assert motion(frozen.frames).sum() == 0


def _eval_recipe(run_dir):
    recipe = tiny_recipe(run_dir)
    recipe["stages"] = [recipe["stages"][0],
                        {"stage": "evaluate", "trajectories": 2, "history_frames": 2, "chunks": 2, "chunk_frames": 2,
                         "steps": 2, "dynamics_scenes": 1, "diversity_samples": 2, "dynamics_chunks": 1,
                         "idm_steps": 2}]
    return recipe


EXPECTED_KEYS = ["idm_accuracy", "idm_translation_accuracy", "idm_rotation_accuracy", "idm_accuracy_shuffled",
                 "idm_accuracy_true_clips", "idm_chance", "idm_per_translation", "idm_per_rotation",
                 "rotation_error_deg", "translation_error", "psnr", "ssim", "psnr_per_chunk", "ssim_per_chunk",
                 "psnr_chunk1", "psnr_chunk2", "psnr_drop_1_to_2", "psnr_shuffled_actions",
                 "copy_last_frame_psnr_per_chunk", "dynamics", "dynamics_generated", "dynamics_generated_frozen",
                 "dynamics_true", "diversity"]


def test_evaluate_stage_biwm_eval_and_compare(tmp_path):
    import yaml

    env = subprocess_env(BIWM_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_eval_recipe(tmp_path / "run")))
    proc = subprocess.run(biwm_cmd() + ["run", str(recipe_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no inverse-dynamics model" not in proc.stdout  # the shipped 32x32 IDM is used

    stage = tmp_path / "run" / "evaluate"
    metrics = json.loads((stage / "metrics.json").read_text())
    for key in EXPECTED_KEYS:
        assert key in metrics, key
    assert len(metrics["psnr_per_chunk"]) == 2 and len(metrics["ssim_per_chunk"]) == 2
    assert metrics["psnr_drop_1_to_2"] == pytest.approx(metrics["psnr_chunk1"] - metrics["psnr_chunk2"])
    assert 0 <= metrics["idm_accuracy"] <= 1 and metrics["attention"] == "bidirectional"
    assert metrics["idm_accuracy_true_clips"] >= 0.9  # the shipped IDM reads true clips correctly
    for name in ("report.md", "drift.png", "idm_per_action.png", "samples.png"):
        assert (stage / name).stat().st_size > 0, name
    assert "![drift](drift.png)" in (stage / "report.md").read_text()
    assert not list(stage.glob(".*tmp*"))  # nothing half-written left behind

    # biwm eval on the run folder, switched to causal attention and to a rendering with no IDM yet
    # (one is trained and cached)
    proc = subprocess.run(biwm_cmd() + ["eval", str(tmp_path / "run"), "--set", "model.attention=causal",
                                        "--set", "evaluate.chunks=3", "--set", "data.toyworld.fov_deg=80",
                                        "--out", str(tmp_path / "causal")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training one (2 steps)" in proc.stdout
    assert len(list((tmp_path / "cache" / "idm").glob("idm-*.safetensors"))) == 1
    causal = json.loads((tmp_path / "causal" / "metrics.json").read_text())
    assert causal["attention"] == "causal" and len(causal["psnr_per_chunk"]) == 3 and "psnr_drop_1_to_3" in causal
    assert causal["weights"].endswith("finetune/model.safetensors")
    assert (tmp_path / "causal" / "report.md").is_file() and (tmp_path / "causal" / "drift.png").is_file()

    proc = subprocess.run(biwm_cmd() + ["compare", f"bidirectional={stage}", f"causal={tmp_path / 'causal'}",
                                        "--out", str(tmp_path / "cmp")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "cmp.json").read_text())
    assert doc["bidirectional"]["psnr_chunk1"] == metrics["psnr_chunk1"]
    assert doc["causal"]["psnr_drop_1_to_3"] == causal["psnr_drop_1_to_3"]
    assert doc["idm_accuracy_true_clips"] == metrics["idm_accuracy_true_clips"]
    assert (tmp_path / "cmp_drift.png").is_file() and (tmp_path / "cmp_idm.png").is_file()
    assert "| `idm_accuracy` |" in (tmp_path / "cmp.md").read_text()


def test_a_report_without_camera_scores_has_no_camera_section(tmp_path):
    """A dataset without scores of its own (no IDM): report.md leaves the camera-following section and
    its plot out, and keeps quality over time; with them, both are there."""
    from biwm.core.report import write_report

    quality = {"trajectories": 2, "chunks": 2, "psnr": 20.0, "psnr_per_chunk": [21.0, 19.0], "ssim": 0.5,
               "ssim_per_chunk": [0.6, 0.4], "psnr_chunk1": 21.0, "psnr_chunk2": 19.0}
    write_report(tmp_path / "plain", quality, "eval")
    report = (tmp_path / "plain" / "report.md").read_text()
    assert "## Quality over time" in report and "| PSNR, first chunk (dB) (`psnr_chunk1`) | 21.00 |" in report
    assert "Camera following" not in report and "toy-world" not in report
    assert not (tmp_path / "plain" / "idm_per_action.png").exists() and (tmp_path / "plain" / "drift.png").is_file()
    write_report(tmp_path / "toy", {**quality, "idm_accuracy": 0.75}, "eval")
    report = (tmp_path / "toy" / "report.md").read_text()
    assert "## Camera following" in report and "| IDM accuracy of the rollout (all 81 labels) (`idm_accuracy`) | 0.750 |" \
        in report
    assert (tmp_path / "toy" / "idm_per_action.png").stat().st_size > 0


def test_biwm_eval_bad_targets(tmp_path):
    env = subprocess_env(COLUMNS="200")
    proc = subprocess.run(biwm_cmd() + ["eval", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(biwm_cmd() + ["eval", str(tmp_path / "empty")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no recipe.yaml" in proc.stderr
    proc = subprocess.run(biwm_cmd() + ["compare", "a=" + str(tmp_path / "empty"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "metrics.json not found" in proc.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"psnr": 20.0}))
    (tmp_path / "setup.yaml").write_text("hardware: a: b\n")
    proc = subprocess.run(biwm_cmd() + ["compare", "a=" + str(tmp_path / "m"), "--out", str(tmp_path / "c"),
                                        "--setup", str(tmp_path / "setup.yaml")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "setup.yaml is not valid YAML" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("c*"))
    # a model file on its own: a bad --set names the file's card, not a recipe.yaml that does not exist
    from conftest import ROOT

    teacher = ROOT / "examples" / "weights" / "toyworld-teacher" / "model.safetensors"
    proc = subprocess.run(biwm_cmd() + ["eval", str(teacher), "--set", "evaluate.run_dir=x", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"{teacher} (its model card): stages[0].run_dir: unknown field" in proc.stderr.replace("\n", "")
    assert "recipe.yaml" not in proc.stderr and not (tmp_path / "e").exists()


def test_evaluate_rejects_an_idm_for_another_rendering(tmp_path):
    from biwm.toyworld.idm import IDMTrainConfig, save_idm, train_idm
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe
    from biwm.toyworld.world import ToyWorldConfig

    other = ToyWorldConfig(height=32, width=32, fov_deg=90)
    model, _ = train_idm(other, IDMTrainConfig(steps=1, batch_size=2, channels=8, pool_clips=1, clip_frames=2,
                                               heldout_clips=1))
    save_idm(tmp_path / "idm.safetensors", model, other, {})
    recipe = _eval_recipe(tmp_path / "run")
    recipe["stages"][0]["steps"] = 1
    recipe["stages"][1]["idm"] = str(tmp_path / "idm.safetensors")
    with pytest.raises(ValueError, match="fov_deg: 90.0 \\(IDM\\) vs 75.0 \\(data\\)"):
        run_recipe(validate_recipe(recipe))
    assert not (tmp_path / "run" / "evaluate" / "DONE").exists()


def test_biwm_eval_finds_the_run_of_any_target(tmp_path):
    import yaml

    from biwm.core.cli import _find_run

    run = tmp_path / "run"
    (run / "finetune" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "finetune2").mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"stages": [{"stage": "finetune"}, {"stage": "finetune"},
                                                                 {"stage": "generate"}]}))
    for path in ("finetune/model.safetensors", "finetune/checkpoints/step_00000002/model.safetensors",
                 "finetune2/model.safetensors"):
        (run / path).write_bytes(b"")
    assert _find_run(run) == (run, run / "finetune2" / "model.safetensors")  # the last training stage
    assert _find_run(run / "finetune") == (run, run / "finetune" / "model.safetensors")
    step = run / "finetune" / "checkpoints" / "step_00000002"
    assert _find_run(step) == (run, step / "model.safetensors")
    assert _find_run(step / "model.safetensors") == (run, step / "model.safetensors")


def test_compare_merges_an_arms_seeds(tmp_path):
    """NAME=A,B: the arm's numbers and per-chunk curves are the seeds' mean, with half the range as the
    spread, each seed's value, the seed count and the chunk-1 margin over copy-last-frame; bad names fail."""
    def evaluation(folder: str, psnr: list[float], idm: float):
        (tmp_path / folder).mkdir()
        m = {"chunks": 2, "psnr": sum(psnr) / 2, "psnr_per_chunk": psnr, "psnr_chunk1": psnr[0],
             "psnr_chunk2": psnr[1], "psnr_drop_1_to_2": psnr[0] - psnr[1], "idm_accuracy": idm,
             "copy_last_frame_psnr_per_chunk": [20.0, 18.0], "sharpness": 1.0, "idm_accuracy_true_clips": 0.95}
        (tmp_path / folder / "metrics.json").write_text(json.dumps(m))
        return tmp_path / folder

    a0, a1 = evaluation("a0", [24.0, 20.0], 0.8), evaluation("a1", [22.0, 19.0], 0.6)
    b = evaluation("b", [21.0, 17.0], 0.5)
    env = subprocess_env(COLUMNS="200")
    proc = subprocess.run(biwm_cmd() + ["compare", f"a={a0},{a1}", f"b={b}", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "c.json").read_text())
    a = doc["a"]
    assert a["seeds"] == 2 and a["psnr_chunk1"] == 23.0 and a["psnr_chunk1_spread"] == 1.0
    assert a["psnr_per_chunk"] == [23.0, 19.5] and a["per_seed"]["idm_accuracy"] == [0.8, 0.6]
    assert abs(a["idm_accuracy"] - 0.7) < 1e-12 and abs(a["idm_accuracy_spread"] - 0.1) < 1e-12
    assert a["per_seed"]["chunk1_margin_db"] == [4.0, 2.0] and a["chunk1_margin_db"] == 3.0
    assert doc["b"]["seeds"] == 1 and doc["b"]["chunk1_margin_db"] == 1.0 and "per_seed" not in doc["b"]
    assert doc["b"]["psnr_drop_1_to_2"] == 4.0 and "psnr_drop_1_to_2_spread" not in doc["b"]
    assert doc["copy_last_frame_psnr_per_chunk"] == [20.0, 18.0] and doc["idm_accuracy_true_clips"] == 0.95
    table = (tmp_path / "c.md").read_text()
    assert "| `psnr_chunk1` | 23.000 ± 1.000 | 21.000 |" in table and "half the range" in table
    proc = subprocess.run(biwm_cmd() + ["compare", f"a={a0}", f"a={a1}", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "given twice" in proc.stderr and not list(tmp_path.glob("d*"))
    proc = subprocess.run(biwm_cmd() + ["compare", f"a={a0},{tmp_path / 'nope'}", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "nope not found" in proc.stderr
