"""scripts/grow_model.py: depth growth keeps what the model computes (the new blocks' output
projections are zero), writes a card that loads the grown shape, and refuses bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TEACHER = ROOT / "examples" / "weights" / "toyworld-teacher" / "model.safetensors"
SCRIPT = ROOT / "scripts" / "grow_model.py"


def _forward(world, seed: int = 0) -> torch.Tensor:
    from biwm.core.camera import CameraTrack, default_intrinsics
    from biwm.core.window import Window

    g = torch.Generator().manual_seed(seed)
    bb = world.backbone
    c, (h, w) = bb.latent_channels, (8, 8)
    b, hist, k = 2, 3, 4
    frames = (hist + k) * bb.temporal_factor
    c2w = torch.eye(4).repeat(b, frames, 1, 1)
    c2w[..., :3, 3] = torch.randn(b, frames, 3, generator=g)
    camera = CameraTrack(c2w=c2w, intrinsics=default_intrinsics(75.0, batch=b),
                         actions=torch.randint(0, 81, (b, frames), generator=g))
    window = Window(text=bb.encode_text(["", ""]),
                    chunk=torch.randn(b, c, k, h, w, generator=g),
                    timestep=bb.timestep(torch.tensor([0.7, 0.3])),
                    history=torch.randn(b, c, hist, h, w, generator=g), camera=camera)
    with torch.no_grad():
        return world(window)


def test_grown_model_computes_what_its_source_computes(tmp_path):
    import biwm.core as biwm
    from biwm.core.checkpoint import dequantize_int8, load_tensors

    source = dequantize_int8(load_tensors(TEACHER))  # the shipped teacher is stored int8
    n = len({k.split(".")[2] for k in source if k.startswith("transformer.blocks.")})
    out = tmp_path / "grown.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), str(TEACHER), str(out), "--layers", str(n + 3)], check=True,
                   capture_output=True, text=True)
    tensors = load_tensors(out)
    blocks = {int(k.split(".")[2]) for k in tensors if k.startswith("transformer.blocks.")}
    assert blocks == set(range(n + 3))
    # old blocks 0, 1, 2 are each followed by a copy (new blocks 1, 3, 5); the rest move up by 3
    assert torch.equal(tensors["transformer.blocks.1.attn1.to_q.weight"], source["transformer.blocks.0.attn1.to_q.weight"])
    assert not tensors["transformer.blocks.1.ffn.net.2.weight"].any()
    assert tensors["transformer.blocks.2.ffn.net.2.weight"].any()
    last = f"transformer.blocks.{n - 1}.ffn.net.2.weight"
    assert torch.equal(tensors[f"transformer.blocks.{n + 2}.ffn.net.2.weight"], source[last])
    small, _ = biwm.load(TEACHER)
    grown, sampler = biwm.load(out)
    assert len(grown.backbone.transformer.blocks) == n + 3
    assert sampler.nfe_per_chunk == 40  # the card's sampler travels with it
    a, b = _forward(small.float()), _forward(grown.float())
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_grow_refuses_fewer_layers_and_names_the_option(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(TEACHER), str(tmp_path / "x.safetensors"), "--layers", "4"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "--layers: must be at least the source's" in r.stderr and "blocks, got 4" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
