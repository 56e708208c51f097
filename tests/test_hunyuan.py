"""The HunyuanVideo-1.5 adapter: parity with diffusers' own forward, per-token timesteps, arbitrary
positions, the causal baseline, text encoders, compressors, the gan loss, weights folders, the VAE's
streaming decode, on tiny random models (CPU)."""

import json
import subprocess

import pytest
import torch
from conftest import check_compressed_window
from test_model import activate_controls, random_camera

from biwm.core.protocols import grid_positions
from biwm.core.window import Window


def hunyuan_backbone(layers: int = 2, seed: int = 0, **options):
    from biwm.backbones.hunyuan import HunyuanOptions, build_hunyuan

    torch.manual_seed(seed)
    return build_hunyuan(HunyuanOptions(preset="tiny", overrides={"num_layers": layers}, **options))


def hunyuan_world(compressor="none", options=None, seed=0, controls=("actions", "plucker")):
    from conftest import world_around

    return world_around(hunyuan_backbone(seed=seed), compressor, options, controls)


def diffusers_forward(transformer, x, t, text):
    """diffusers' own forward as the t2v pipeline calls it: zero conditioning latents and mask, zero image
    embeddings (every image token masked)."""
    b, c, f, h, w = x.shape
    cond = torch.zeros(b, transformer.config.in_channels - c, f, h, w)
    mllm, byt5 = text["mllm"], text["byt5"]
    return transformer(torch.cat([x, cond], 1), t, mllm.embeds, mllm.mask.long(),
                       encoder_hidden_states_2=byt5.embeds, encoder_attention_mask_2=byt5.mask.long(),
                       image_embeds=torch.zeros(b, 3, transformer.config.image_embed_dim)).sample


def test_world_model_equals_diffusers_forward_with_sharded_weights_from_a_recipe(tmp_path):
    """A tiny transformer saved by save_pretrained in several shards, loaded through a recipe's
    ``weights:``: one chunk with no history and no control gives diffusers' own output."""
    from conftest import world_from_sharded_weights

    world, reference = world_from_sharded_weights(tmp_path, "hunyuan", hunyuan_backbone(seed=3).transformer, "2MB")

    x = torch.randn(2, 48, 3, 8, 8)
    t = torch.tensor([731.0, 12.0])
    text = world.backbone.encode_text(['a room with a sign "EXIT"', ""])
    ours = world(Window(text=text, chunk=x, timestep=t))
    ref = diffusers_forward(reference, x, t, text)
    assert ours.shape == ref.shape == x.shape
    assert (ours - ref).abs().max() <= 1e-5
    # the controls are zero-initialised: a camera changes nothing before training
    torch.testing.assert_close(world(Window(text=text, chunk=x, timestep=t, camera=random_camera(2, 3))), ours,
                               rtol=0, atol=1e-6)


def test_rotary_matches_diffusers_at_integers_and_is_continuous():
    bb = hunyuan_backbone()
    cos, sin = bb.rotary(grid_positions(3, 4, 4))
    ref_cos, ref_sin = bb.transformer.rope(torch.zeros(1, 97, 3, 8, 8))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    half = bb.rotary(torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64))[0][0]
    lo, hi = cos[0], cos[16]  # frames 0 and 1 at row 0, col 0
    assert torch.all(half <= torch.maximum(lo, hi) + 1e-6) and torch.all(half >= torch.minimum(lo, hi) - 1e-6)
    assert not torch.equal(half, lo) and not torch.equal(half, hi)


def test_per_token_timesteps_and_shifted_positions():
    bb = hunyuan_backbone()
    x = torch.randn(1, 48, 2, 8, 8)
    text = bb.encode_text(["a room"])
    seq = bb.patch_embed(x).flatten(2).transpose(1, 2)
    pos = grid_positions(2, 4, 4)
    rot = bb.rotary(pos)
    same = bb.run_blocks(seq, torch.full((1, 32), 500.0), text, rot).hidden
    mixed_t = torch.full((1, 32), 500.0)
    mixed_t[:, :16] = 0.0  # the first frame clean, as history is
    mixed = bb.run_blocks(seq, mixed_t, text, rot).hidden
    assert (same - mixed).abs().max() > 1e-3
    # fractional positions: the output moves continuously with them; unlike Wan's, a shift of every frame
    # is not invisible (the text tokens carry no rotary embedding, so video-text attention sees absolute
    # positions)
    def at(offset: float) -> torch.Tensor:
        moved = bb.rotary(pos + torch.tensor([offset, 0, 0], dtype=pos.dtype))
        return bb.run_blocks(seq, torch.full((1, 32), 500.0), text, moved).hidden

    assert (at(1e-3) - same).abs().max() < 1e-3 and (at(7.5) - same).abs().max() > 1e-3


def test_causal_window_blocks_later_frames_and_a_full_mask_is_bidirectional():
    world = hunyuan_world()
    activate_controls(world, 0.05)
    text = world.backbone.encode_text(["a room", ""])
    g = torch.Generator().manual_seed(0)
    chunk, history = torch.randn(2, 48, 3, 8, 8, generator=g), torch.randn(2, 48, 2, 8, 8, generator=g)
    window = Window(text=text, chunk=chunk, timestep=torch.tensor([600.0, 600.0]), history=history,
                    camera=random_camera(2, 5), attention="causal")
    out = world(window)
    later = chunk.clone()
    later[:, :, 2] += 3.0
    out_later = world(Window(**{**window.__dict__, "chunk": later}))
    torch.testing.assert_close(out_later[:, :, :2], out[:, :, :2], rtol=1e-5, atol=1e-5)
    assert (out_later[:, :, 2] - out[:, :, 2]).abs().max() > 1e-3
    bidir = Window(**{**window.__dict__, "attention": "bidirectional"})
    assert (world(Window(**{**bidir.__dict__, "chunk": later}))[:, :, :2] - world(bidir)[:, :, :2]).abs().max() > 1e-3
    # the window-mask path with a mask that masks nothing is diffusers' processor
    bb = world.backbone
    seq = bb.patch_embed(chunk).flatten(2).transpose(1, 2)
    rot, t = bb.rotary(grid_positions(3, 4, 4)), torch.full((2, 48), 300.0)
    full = bb.run_blocks(seq, t, text, rot, attention_mask=torch.ones(48, 48, dtype=torch.bool)).hidden
    torch.testing.assert_close(full, bb.run_blocks(seq, t, text, rot).hidden, rtol=1e-5, atol=1e-5)


def test_history_and_control_reach_the_output_and_gradients_reach_the_right_parameters():
    world = hunyuan_world()
    activate_controls(world, 0.02)
    bb = world.backbone
    text = bb.encode_text(['a room with a sign "EXIT"', ""])  # quoted text: ByT5 has tokens to pass on
    g = torch.Generator().manual_seed(1)
    base = Window(text=text, chunk=torch.randn(2, 48, 2, 8, 8, generator=g), timestep=torch.tensor([500.0, 200.0]),
                  history=torch.randn(2, 48, 3, 8, 8, generator=g), camera=random_camera(2, 5))
    out = world(base)
    other = base.history.clone()
    other[:, :, -1] += 1.0
    assert (world(Window(**{**base.__dict__, "history": other})) - out).abs().max() > 1e-4
    assert (world(Window(**{**base.__dict__, "camera": random_camera(2, 5, seed=1)})) - out).abs().max() > 1e-4
    out.pow(2).mean().backward()
    for name, module in world.controls.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    tr = bb.transformer
    for module in (tr.x_embedder, tr.time_embed, tr.context_embedder, tr.context_embedder_2, tr.cond_type_embed,
                   tr.transformer_blocks[0].norm1, tr.transformer_blocks[0].ff_context, tr.transformer_blocks[1].ff,
                   tr.norm_out, tr.proj_out):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module
    # the last block's text stream goes nowhere (as in diffusers' forward), nor does the image stream (SigLIP,
    # image-to-video, left out)
    for module in (tr.transformer_blocks[1].ff_context, tr.image_embedder):
        assert all(p.grad is None for p in module.parameters()), module
    # the patch embedding's conditioning channels are zero inputs: no gradient reaches their weights
    assert tr.x_embedder.proj.weight.grad[:, 48:].abs().sum() == 0


def test_text_encoders_two_names_cache_and_null_prompt():
    bb = hunyuan_backbone()
    enc = bb.text_encoder
    calls = []
    for part in (enc.mllm, enc.byt5):
        part.register_forward_hook(lambda _m, inputs, _o: calls.append(list(inputs[0])))
    text = bb.encode_text(['a sign "OPEN"', ""])
    assert text.names == ("mllm", "byt5")
    assert text["mllm"].embeds.shape[2] == 32 and text["byt5"].embeds.shape[2] == 32
    assert text["mllm"].embeds.dtype == torch.float32
    # the null prompt: one real token for Qwen2.5-VL (the pipeline's " "), none for ByT5 (no quoted text)
    assert text["mllm"].mask[1].sum() == 1 and text["byt5"].mask[1].sum() == 0
    assert text["byt5"].mask[0].sum() == len('Text "OPEN". ')
    again = bb.encode_text(["", 'a sign "OPEN"', ""])
    assert len(calls) == 2  # each encoder ran once, for both prompts; the rest came from the cache
    for name in text.names:
        assert torch.equal(again.select(1)[name].embeds, text.select(0)[name].embeds)
        assert torch.equal(again.select(2)[name].mask, text.select(1)[name].mask)
    from biwm.core.text import TextConditioning

    with pytest.raises(ValueError, match="expected 'mllm' and 'byt5'"):
        bb.run_blocks(torch.zeros(1, 16, 256), torch.zeros(1, 16),
                      TextConditioning.from_tensor(torch.zeros(1, 2, 32), "t5"), bb.rotary(grid_positions(1, 4, 4)))


@pytest.mark.parametrize("name, options", [("framepack", {"layout": [[1, 1], [2, 2]]}),
                                           ("packforcing", {})])
def test_compressors_derive_their_kernels_from_the_latent_channels(name, options):
    world = hunyuan_world(name, options)
    activate_controls(world, 0.05)
    check_compressed_window(world)


def test_gan_reads_the_video_stream_of_the_dual_stream_blocks():
    from biwm.losses.gan import GAN, GANOptions

    world = hunyuan_world()
    gan = GAN(GANOptions(hidden=16, registers=2), backbone=world.backbone)
    assert gan.blocks == [0, 1]
    g = torch.Generator().manual_seed(0)
    window = Window(text=world.backbone.encode_text(["", ""]), chunk=torch.randn(2, 48, 2, 8, 8, generator=g),
                    timestep=torch.tensor([300.0, 300.0]), history=torch.randn(2, 48, 2, 8, 8, generator=g))
    logits = gan.logits(world, window)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert gan.registers.grad.abs().sum() > 0
    assert world.backbone.transformer.transformer_blocks[0].ff.net[0].proj.weight.grad.abs().sum() > 0


def test_speed_options_attention_kernel_and_decoder_capabilities():
    from biwm.core.protocols import AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder

    bb = hunyuan_backbone()
    for capability in (AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder):
        assert isinstance(bb, capability)
    x = torch.randn(1, 48, 2, 8, 8)
    text = bb.encode_text(["a room"])
    seq = bb.patch_embed(x).flatten(2).transpose(1, 2)
    rot, t = bb.rotary(grid_positions(2, 4, 4)), torch.full((1, 32), 400.0)
    auto = bb.run_blocks(seq, t, text, rot).hidden
    bb.set_attention_kernel("math")
    assert all(p._attention_backend == "_native_math" for p in bb._processors)
    torch.testing.assert_close(bb.run_blocks(seq, t, text, rot).hidden, auto, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention kernel 'fast'"):
        bb.set_attention_kernel("fast")


def test_vae_codec_streams_like_a_full_decode():
    from diffusers import AutoencoderKLHunyuanVideo15

    from biwm.backbones.hunyuan import HunyuanVAECodec

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    codec = HunyuanVAECodec(vae.eval(), decode_context=8)
    latents = torch.randn(1, 4, 5, 2, 2)
    full = codec.decode(latents)
    assert full.shape == (1, 3, 17, 32, 32)  # 1 + 4 * (5 - 1) frames, 16x spatial
    stream = codec.stream_decoder()
    pieces = [stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:3]), stream.decode(latents[:, :, 3:])]
    assert [p.shape[2] for p in pieces] == [1, 8, 8]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=1e-5, atol=1e-5)
    assert codec.encode(torch.zeros(1, 3, 5, 32, 32)).shape == (1, 4, 2, 2, 2)


def test_weights_folder_errors_name_the_missing_parts_and_the_wrong_shape(tmp_path):
    import yaml
    from conftest import biwm_cmd, subprocess_env, tiny_recipe
    from test_defects import wan_folder as diffusers_folder  # a transformer config + empty weights files

    from biwm.backbones.hunyuan import PRESETS

    published = PRESETS["hunyuanvideo-1.5-480p"]["transformer"]
    no_vae = diffusers_folder(tmp_path / "a", published, parts=("text_encoder", "tokenizer"), weights_file=True)
    wrong = diffusers_folder(tmp_path / "b", {**published, "num_layers": 20, "rope_axes_dim": [16, 56, 56]},
                             parts=("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                             weights_file=True)
    data = tiny_recipe(tmp_path / "run")
    results = {}
    for key, folder in (("no_vae", no_vae), ("wrong", wrong)):
        data["model"]["backbone"] = {"name": "hunyuan", "options": {"preset": "hunyuanvideo-1.5-480p",
                                                                    "weights": str(folder)}}
        (tmp_path / f"{key}.yaml").write_text(yaml.safe_dump(data))
        results[key] = subprocess.run(biwm_cmd() + ["validate", str(tmp_path / f"{key}.yaml")], capture_output=True,
                                      text=True, env=subprocess_env(COLUMNS="400"))
    no_vae, wrong = results["no_vae"], results["wrong"]
    assert no_vae.returncode == 2 and "model.backbone.options" in no_vae.stderr
    assert "has no vae/, text_encoder_2/, tokenizer_2/" in no_vae.stderr and "random_init" in no_vae.stderr
    assert wrong.returncode == 2 and "does not match preset 'hunyuanvideo-1.5-480p'" in wrong.stderr
    assert "num_layers is 20, expected 54" in wrong.stderr and "rope_axes_dim" not in wrong.stderr
    assert "Traceback" not in no_vae.stderr + wrong.stderr

    from pydantic import ValidationError

    from biwm.backbones.hunyuan import HunyuanOptions

    with pytest.raises(ValidationError, match="needs a local diffusers-format directory"):
        HunyuanOptions(preset="hunyuanvideo-1.5-480p")
    with pytest.raises(ValidationError, match=r"only the pixel-codec presets \(tiny\)"):
        HunyuanOptions(preset="hunyuanvideo-1.5-480p", random_init=True, overrides={"num_layers": 2})
    options = HunyuanOptions(preset="hunyuanvideo-1.5-480p", weights=str(tmp_path / "a"), random_init=True)
    assert options.missing_parts() == ["vae", "text_encoder_2", "tokenizer_2"]
    assert options.frame_geometry() == (4, 16)


def test_published_preset_builds_the_release_shape_on_the_meta_device():
    """The 480p preset's transformer has the release's 8.3B parameters (built without memory)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from biwm.backbones.hunyuan import PRESETS

    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**PRESETS["hunyuanvideo-1.5-480p"]["transformer"])
    params = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < params < 8.4e9, params
    assert model.config.in_channels == 65 and model.config.out_channels == 32 and len(model.transformer_blocks) == 54


def test_list_plugins_shows_hunyuan():
    from conftest import biwm_cmd

    rows = json.loads(subprocess.run(biwm_cmd() + ["list-plugins", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    hunyuan = [r for r in rows if r["name"] == "hunyuan"]
    assert hunyuan and hunyuan[0]["kind"] == "backbone" and "HunyuanVideo-1.5" in hunyuan[0]["description"]


def test_the_backbones_recipe_runs_finetune_distill_and_evaluate_for_hunyuan_tiny(tmp_path):
    """examples/backbones.yaml with only model.backbone changed (scripts/compare_backbones.py), at a few
    steps: stage 1, stage 2 and the evaluation all run for the tiny HunyuanVideo-1.5."""
    from conftest import backbones_recipe_smoke_run

    backbones_recipe_smoke_run(tmp_path, "hunyuan")
