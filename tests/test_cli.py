"""Small CLI commands: data toyworld, and bad arguments."""

import subprocess

from conftest import biwm_cmd, subprocess_env


def test_data_toyworld_writes_a_loadable_dataset(tmp_path):
    from biwm.toyworld.world import load_dataset

    out = tmp_path / "toy"
    proc = subprocess.run(biwm_cmd() + ["data", "toyworld", "--out", str(out), "--clips", "3", "--frames", "5",
                                        "--height", "16", "--width", "16", "--split", "heldout"],
                          capture_output=True, text=True, env=subprocess_env(COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    clips = load_dataset(out)
    assert clips.frames.shape == (3, 5, 3, 16, 16)
    assert min(clips.seeds) >= 1_000_000_000  # held-out seed range
    assert (out / "preview.png").is_file()


def test_data_toyworld_rejects_unknown_split(tmp_path):
    proc = subprocess.run(biwm_cmd() + ["data", "toyworld", "--out", str(tmp_path / "x"), "--split", "test"],
                          capture_output=True, text=True, env=subprocess_env(COLUMNS="200"))
    assert proc.returncode == 2
    assert "--split: 'test' is not allowed; allowed: train, heldout" in proc.stderr
    assert not (tmp_path / "x").exists()
