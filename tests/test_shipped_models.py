"""The shipped toy-lab models (examples/weights/toyworld-teacher and toyworld-student) regress if this
fails: on held-out clips, each one's first generated chunk beats repeating the last true frame (the
trivial forecast) by at least 2 dB, on the CPU, loaded from the model file alone; the student samples
with its own 4 steps and no guidance, the teacher with its card's sampler."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT

WEIGHTS = ROOT / "examples" / "weights"


def first_chunk_margin(path, clips: int = 8) -> tuple[float, float, object]:
    import biwm.core as biwm
    from biwm.toyworld.world import ToyWorldConfig
    from biwm.core.data import video_frames_for
    from biwm.toyworld.data import toyworld_latents
    from biwm.core.evaluation import quality_scores, rollout_video
    from biwm.core.stages.common import read_card, text_embeddings

    world, sampler = biwm.load(path)
    card = read_card(path / "model.safetensors")
    bb, history, chunk = world.backbone, 4, 4
    toy = ToyWorldConfig(**card["data"]["toyworld"])
    data = toyworld_latents("heldout", clips, history + chunk, toy, bb, None, "shipped", keep_frames=True)
    text, null = text_embeddings(world, card["data"].get("prompt", ""), clips, torch.device("cpu"))
    hv = video_frames_for(history, bb.temporal_factor)
    truth = data.frames[:, hv:].float().div(127.5).sub(1)
    last = data.frames[:, hv - 1:hv].float().div(127.5).sub(1).expand_as(truth)
    with torch.no_grad():
        video = rollout_video(world, text, null, data.latents[:, :, :history],
                              data.camera.frames(slice(bb.temporal_factor - 1, None)), 1, chunk, sampler, 0,
                              "bidirectional")
    frames = chunk * bb.temporal_factor
    generated = quality_scores(video, truth, frames)["psnr_per_chunk"][0]
    copy = quality_scores(last, truth, frames)["psnr_per_chunk"][0]
    return generated, copy, sampler


@pytest.mark.parametrize("name,student", [("toyworld-teacher", False), ("toyworld-student", True)])
def test_a_shipped_model_beats_copy_last_frame_on_its_first_chunk(name, student):
    generated, copy, sampler = first_chunk_margin(WEIGHTS / name)
    assert sampler.student == student
    assert sampler.nfe_per_chunk == (4 if student else 40)  # the student's 4 steps; the teacher's 20 with CFG
    assert generated >= copy + 2.0, f"{name}: chunk 1 at {generated:.2f} dB, copy-last-frame {copy:.2f} dB"
