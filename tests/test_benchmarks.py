"""benchmarks/rollout.py, train.py and train_lab.py on the CPU with the tiny preset (CI runs them so
they keep working; the timings they print are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)


def test_rollout_benchmark_on_cpu_counts_frames_flops_and_merges_presets(tmp_path):
    out = tmp_path / "rollout"
    proc = run("rollout.py", "--preset", "tiny", "--seconds", "1.5", "--repeats", "1", "--dtype", "float32",
               "--variants", "eager,overlap,nvfp4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    model = data["models"]["tiny"]
    # the transformer's weights as stored: fp32, then its block linears packed to NVFP4 (measured 14.7 -> 4.4 MiB)
    weights = {name: r["weight_bytes"] for name, r in model["variants"].items()}
    assert weights["eager"] == weights["overlap"] > 3 * weights["nvfp4"] > 0
    assert model["variants"]["nvfp4"]["fps_sustained"] > 0 and "| nvfp4 |" in out.with_suffix(".md").read_text()
    setup = model["setup"]
    # 1.5 s at 16 fps = 24 frames; the pixel codec has 1 frame per latent frame: 6 chunks of 4 frames of
    # 32x32 pixels = 8x8 latents = 4x4 tokens
    assert (setup["chunks"], setup["frames"], setup["chunk_tokens"]) == (6, 24, 4 * 16)
    # framepack's default layout over 19+ frames: 1 full frame + 1 frame at 2x + 4 groups of 4 at 4x
    assert setup["history_tokens_steady"] == 16 + 4 + 4 * 1 and setup["steady_from_chunk"] == 5
    for name in ("eager", "overlap"):
        r = model["variants"][name]
        assert r["fps_sustained"] > 0 and r["first_chunk_s"] > 0 and r["dit_chunk_s"] > 0
        assert abs(r["fps_sustained"] * r["wall_s"] - setup["frames"]) < 1e-6 * setup["frames"]
        assert 0 < r["dit_mfu"]
    # FLOPs of a steady chunk: 4 forwards of 64 + 24 tokens through 4 blocks of width 256, at least the
    # linears' 2 x tokens x weights (self-attention q/k/v/o, cross-attention q/o, FFN in and out)
    linears = 4 * (6 * 256 * 256 + 2 * 256 * 512)
    tokens = 64 + 24
    assert model["attention"]["dit_tflop_per_chunk"] * 1e12 >= 4 * 2 * tokens * linears
    assert model["attention"]["dit_tflop_per_chunk"] * 1e12 < 4 * 2 * tokens * linears * 3
    assert data["preset"] == "tiny" and data["baseline_fps"] == model["variants"]["eager"]["fps_sustained"]
    assert "| eager |" in out.with_suffix(".md").read_text()

    # a second preset merges into the same file instead of replacing it
    data["models"]["other"] = model
    out.with_suffix(".json").write_text(json.dumps(data))
    proc = run("rollout.py", "--preset", "tiny", "--seconds", "0.5", "--repeats", "1", "--dtype", "float32",
               "--variants", "eager", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads(out.with_suffix(".json").read_text())
    assert set(merged["models"]) == {"tiny", "other"} and merged["models"]["tiny"]["setup"]["chunks"] == 2


def test_rollout_benchmark_rejects_unknown_variants():
    proc = run("rollout.py", "--preset", "tiny", "--variants", "eager,turbo")
    assert proc.returncode == 2 and "--variants: unknown turbo" in proc.stderr
    proc = run("rollout.py", "--preset", "tiny", "--profile", "decoder,warp")
    assert proc.returncode == 2 and "--profile: unknown warp" in proc.stderr


def test_train_benchmark_on_cpu_times_stage1_and_both_dmd_critics(tmp_path):
    out = tmp_path / "train"
    proc = run("train.py", "--preset", "tiny", "--steps", "1", "--history", "8", "--dtype", "float32",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    s1, full, lora = data["stage1"], data["dmd"], data["dmd-lora"]
    fp8 = data["stage1-fp8"]  # the same step with torchao float8 training, emulated on the CPU
    assert fp8["fp8_emulated"] is True and fp8["vs_stage1"] == fp8["step_s"] / s1["step_s"] > 0
    assert fp8["tflop_per_step"] == s1["tflop_per_step"] and "| stage1-fp8 |" in out.with_suffix(".md").read_text()
    assert s1["window_tokens"] == 16 + 4 + 2 + 4 * 16  # framepack over 8 frames (1 + 2 + 5 at 4x) + the 4-frame chunk
    for r in (s1, full, lora):
        assert r["step_s"] > 0 and r["mfu"] > 0 and r["hfu"] > r["mfu"]
        # gradient checkpointing recomputes the grad-enabled forwards: hardware minus model FLOPs is one forward each
        assert r["tflop_per_step_with_recompute"] > r["tflop_per_step"]
    assert full["critic"] == "full" and lora["critic"] == "lora"
    assert lora["critic_trainable_params_m"] < full["critic_trainable_params_m"] / 10
    assert s1["trainable_params_m"] == full["critic_trainable_params_m"]
    # the full DMD iteration: 5 chunks x 4 steps of the generator, teacher with CFG (2x batch), critic twice
    assert full["tflop_per_step"] > 20 * s1["tflop_per_step"] / 3 / 2
    assert data["gradient_checkpointing"] is True and data["device"]


def test_train_benchmark_rejects_unknown_parts():
    proc = run("train.py", "--preset", "tiny", "--parts", "stage3")
    assert proc.returncode == 2 and "--parts: unknown stage3" in proc.stderr


def test_train_lab_benchmark_on_cpu_times_every_variant(tmp_path):
    """Every variant but the inductor-compiled whole forward (minutes per window shape on a CPU; the
    compile_world tests in test_speed.py check it), with windows of history 0-1 so the graphed variant
    captures two shapes."""
    out = tmp_path / "lab"
    variants = ["before", "resident", "bf16", "compile", "compile-bf16", "world-bf16-cg"]
    proc = run("train_lab.py", "--presets", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--clips", "4",
               "--max-history", "1", "--variants", ",".join(variants), "--profile", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == variants and data["batch"] == 2
    for variant in rows:  # --profile: a torch.profiler table per variant
        table = (tmp_path / f"lab.tiny.{variant}.profile.txt").read_text()
        assert f"tiny {variant}, batch 2, 1 steps" in table and "aten::mm" in table
    assert rows["before"]["speedup_over_before"] == 1.0
    # graphs per variant: none eager; the graphed forward records one per history length (0 and 1)
    assert rows["resident"]["compiled_graphs"] is None and rows["world-bf16-cg"]["compiled_graphs"] == 2
    for r in rows.values():
        assert r["seconds_per_step"] > 0 and r["steps_per_second"] == 1 / r["seconds_per_step"]
        assert r["parameters_m"] == rows["before"]["parameters_m"] > 0
    assert "| tiny | bf16 |" in out.with_suffix(".md").read_text()


def test_train_lab_benchmark_rejects_unknown_variants():
    proc = run("train_lab.py", "--variants", "before,turbo", "--out", "/tmp/never")
    assert proc.returncode == 2 and "--variants: unknown turbo" in proc.stderr


def test_play_benchmark_on_cpu_times_key_changes_through_the_websocket(tmp_path):
    out = tmp_path / "play"
    proc = run("play.py", "--preset", "tiny", "--dtype", "float32", "--presses", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "key→frame median (ms)" in proc.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["presses"] == 3 and data["setup"]["frame"] == [32, 32] and data["setup"]["chunk_video_frames"] == 4
    latency = data["latency_ms"]
    # a change is applied from the next chunk on, which takes a whole generation to arrive
    assert 0.5 * data["chunk_generation_ms_median"] <= latency["min"] <= latency["median"] <= latency["p95"]
    assert data["frames_received"] >= 4 * 3 and data["fps_delivered"] > 0


def test_data_cache_benchmark_on_cpu(tmp_path):
    proc = run("data_cache.py", "--preset", "tiny", "--clips", "3", "--frames", "9", "--dtype", "float32",
               "--clips-per-shard", "2", "--out", str(tmp_path / "data_cache"))
    data = json.loads((tmp_path / "data_cache.json").read_text()) if proc.returncode == 0 else proc.stderr[-2000:]
    assert isinstance(data, dict), data  # else the benchmark's error output
    assert (data["clips"], data["frames"], data["height"], data["width"]) == (3, 9, 32, 32), data
    # the pixel codec keeps every frame: 9 latent frames of 48 x 8 x 8 float32 per clip, plus cameras
    assert data["clips_per_s"] > 0 and data["cache_bytes_per_clip"] > 9 * 48 * 8 * 8 * 4


@pytest.mark.parametrize("preset", ["hunyuan-tiny", "ltx-tiny"])
def test_both_benchmarks_take_the_hunyuan_and_ltx_presets(tmp_path, preset):
    """The HunyuanVideo-1.5 and LTX-2.3 presets through the same benchmarks: their tiny ones on the CPU (the
    GPU runs of hunyuanvideo-1.5-480p and ltx-2.3-22b are for a machine that has one)."""
    proc = run("rollout.py", "--preset", preset, "--seconds", "0.5", "--repeats", "1", "--dtype", "float32",
               "--variants", "eager", "--out", str(tmp_path / "rollout"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = json.loads((tmp_path / "rollout.json").read_text())["models"][preset]
    assert model["setup"]["chunks"] == 2 and model["setup"]["chunk_tokens"] == 4 * 16
    assert model["variants"]["eager"]["fps_sustained"] > 0
    proc = run("train.py", "--preset", preset, "--steps", "1", "--history", "4", "--dtype", "float32",
               "--parts", "stage1", "--out", str(tmp_path / "train"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["preset"] == preset and data["stage1"]["step_s"] > 0 and data["stage1"]["mfu"] > 0
