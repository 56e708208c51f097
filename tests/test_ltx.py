"""The LTX-2.3 adapter: parity with diffusers' own forward, the video path unaffected by the audio stand-in,
windows with history (per-token timesteps, arbitrary positions, the causal baseline), gradients, compressors,
the gan loss, weights folders, the VAE codec, on tiny random models (CPU)."""

import json
import subprocess

import pytest
import torch
from conftest import check_compressed_window
from test_model import activate_controls, random_camera

from biwm.core.protocols import grid_positions
from biwm.core.window import Window


def ltx_backbone(layers: int = 2, seed: int = 0, **options):
    from biwm.backbones.ltx import LTXOptions, build_ltx

    torch.manual_seed(seed)
    return build_ltx(LTXOptions(preset="tiny", overrides={"num_layers": layers}, **options))


def ltx_world(compressor="none", options=None, seed=0, controls=("actions", "plucker")):
    from conftest import world_around

    return world_around(ltx_backbone(seed=seed), compressor, options, controls)


def diffusers_forward(transformer, x, t, text, audio, audio_t=None, isolate=True):
    """diffusers' own forward on packed latents ``x`` [B, C, F, h, w] with one timestep per sample ``t`` (per
    token, as the pipeline passes it; ``sigma`` too, as the pipeline does for LTX-2.3), the audio stream
    ``audio`` [B, N, C_audio] at ``audio_t``; the video output unpacked."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline as P

    b, _, f, h, w = x.shape
    cfg = transformer.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    tokens = (f // pt) * (h // p) * (w // p)
    enc = text["gemma"]
    g = torch.Generator().manual_seed(7)
    audio_text = torch.randn(b, 3, cfg.audio_num_attention_heads * cfg.audio_attention_head_dim, generator=g)
    out = transformer(hidden_states=P._pack_latents(x, p, pt), audio_hidden_states=audio,
                      encoder_hidden_states=enc.embeds, audio_encoder_hidden_states=audio_text,
                      timestep=t[:, None].expand(b, tokens), sigma=t, audio_timestep=t if audio_t is None else audio_t,
                      encoder_attention_mask=enc.mask.long(), num_frames=f, height=h, width=w,
                      audio_num_frames=audio.shape[1], isolate_modalities=isolate, return_dict=False)[0]
    return P._unpack_latents(out, f // pt, h // p, w // p, p, pt)


def test_world_model_equals_diffusers_forward_with_sharded_weights_from_a_recipe(tmp_path):
    """A tiny transformer saved by save_pretrained in several shards, loaded through a recipe's
    ``weights:``: one chunk with no history and no control gives diffusers' own output."""
    from conftest import world_from_sharded_weights

    world, reference = world_from_sharded_weights(tmp_path, "ltx", ltx_backbone(seed=3).transformer, "1MB")

    x = torch.randn(2, 48, 3, 8, 8)
    t = torch.tensor([731.0, 12.0])
    text = world.backbone.encode_text(["a room", ""])
    ours = world(Window(text=text, chunk=x, timestep=t))
    ref = diffusers_forward(reference, x, t, text, audio=torch.randn(2, 5, 8))
    assert ours.shape == ref.shape == x.shape
    assert (ours - ref).abs().max() <= 1e-6
    # the controls are zero-initialised: a camera changes nothing before training
    torch.testing.assert_close(world(Window(text=text, chunk=x, timestep=t, camera=random_camera(2, 3))), ours,
                               rtol=0, atol=1e-6)


def test_the_video_path_is_unaffected_by_the_audio_stand_in():
    """With the audio-video cross-attention off (what the adapter runs), diffusers' video output is the same
    for any audio stream, the adapter's stand-in included; with it on, the audio changes the video."""
    bb = ltx_backbone()
    tr = bb.transformer
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 48, 2, 8, 8, generator=g), torch.tensor([500.0, 80.0])
    text = bb.encode_text(["a room", "a hall"])
    ours = bb.unembed(bb.run_blocks(bb.patch_embed(x).flatten(2).transpose(1, 2), t[:, None].expand(2, 32), text,
                                    bb.rotary(grid_positions(2, 4, 4))), (2, 4, 4))
    audios = [(torch.randn(2, 5, 8, generator=g), None), (10 * torch.randn(2, 9, 8, generator=g), None),
              (torch.randn(2, 1, 8, generator=g), torch.tensor([0.0, 999.0])), (torch.zeros(2, 1, 8), None)]
    for audio, audio_t in audios:
        assert torch.equal(diffusers_forward(tr, x, t, text, audio, audio_t), ours)
    joint = [diffusers_forward(tr, x, t, text, audio, audio_t, isolate=False) for audio, audio_t in audios[:2]]
    assert (joint[0] - joint[1]).abs().max() > 1e-3 and (joint[0] - ours).abs().max() > 1e-3

    # one block: the video output does not read the audio inputs at all
    block = bb.block_modules()[0]
    hidden = torch.randn(2, 32, 256, generator=g)
    args = dict(hidden_states=hidden, encoder_hidden_states=torch.randn(2, 6, 256, generator=g),
                temb=torch.randn(2, 32, 9 * 256, generator=g), temb_ca_scale_shift=None, temb_ca_audio_scale_shift=None,
                temb_ca_gate=None, temb_ca_audio_gate=None, temb_prompt=torch.randn(2, 1, 512, generator=g),
                video_rotary_emb=tuple(r.expand(2, -1, -1, -1) for r in bb.rotary(grid_positions(2, 4, 4))),
                use_a2v_cross_attention=False, use_v2a_cross_attention=False)
    stand_in = block(hidden, args["encoder_hidden_states"], args["temb"], args["temb_prompt"], torch.zeros(2, 1, 6),
                     args["video_rotary_emb"], None)[0]
    for n in (1, 4):
        audio = dict(audio_hidden_states=torch.randn(2, n, 32, generator=g),
                     audio_encoder_hidden_states=torch.randn(2, 3, 32, generator=g),
                     temb_audio=torch.randn(2, n, 9 * 32, generator=g))
        assert torch.equal(block.block(**args, **audio)[0], stand_in)


def test_rotary_matches_diffusers_at_integers_and_is_continuous():
    bb = ltx_backbone()
    rope = bb.transformer.rope
    coords = bb.video_coords(grid_positions(3, 4, 4))
    assert torch.equal(coords, rope.prepare_video_coords(1, 3, 8, 8, torch.device("cpu"), fps=24.0))
    cos, sin = bb.rotary(grid_positions(3, 4, 4))
    ref_cos, ref_sin = rope(rope.prepare_video_coords(1, 3, 8, 8, torch.device("cpu")))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert cos.shape == (1, 4, 48, 32)  # split rotary: [B, heads, tokens, head_dim / 2]
    def at(frame: float) -> torch.Tensor:
        return bb.rotary(torch.tensor([[frame, 0.0, 0.0]], dtype=torch.float64))[0][0, :, 0]

    assert torch.equal(at(1.0), cos[0, :, 16])  # frame 1 at row 0, col 0
    assert (at(1.5) - at(1.0)).abs().max() > 1e-3 and (at(1.5) - at(2.0)).abs().max() > 1e-3
    assert (at(1.5 + 1e-6) - at(1.5)).abs().max() < 5e-3  # continuous in the position
    # the time axis is in seconds: half the frame rate, twice the time
    slow = ltx_backbone(frame_rate=12.0).video_coords(grid_positions(3, 4, 4))
    assert torch.equal(slow[:, 0], 2 * coords[:, 0]) and torch.equal(slow[:, 1:], coords[:, 1:])


def test_a_window_with_history_shapes_values_and_per_token_timesteps():
    world = ltx_world()
    activate_controls(world, 0.05)
    bb = world.backbone
    text = bb.encode_text(["a room", ""])
    g = torch.Generator().manual_seed(1)
    chunk, history = torch.randn(2, 48, 2, 8, 8, generator=g), torch.randn(2, 48, 3, 8, 8, generator=g)
    base = Window(text=text, chunk=chunk, timestep=torch.tensor([500.0, 200.0]), history=history,
                  camera=random_camera(2, 5))
    out = world(base)
    assert out.shape == (2, 48, 2, 8, 8) and torch.isfinite(out).all()
    assert world.last_window_tokens == 4 * 16 + 2 * 16 - 16  # the compressor keeps 4 history frames: 3 here
    other = history.clone()
    other[:, :, -1] += 1.0
    assert (world(Window(**{**base.__dict__, "history": other})) - out).abs().max() > 1e-4
    assert (world(Window(**{**base.__dict__, "camera": random_camera(2, 5, seed=1)})) - out).abs().max() > 1e-4
    # the same chunk alone differs: the history is seen
    assert (world(Window(text=text, chunk=chunk, timestep=base.timestep, camera=random_camera(2, 2))) - out
            ).abs().max() > 1e-4
    # per-token timesteps reach the blocks: a clean first frame changes the rest
    seq = bb.patch_embed(chunk).flatten(2).transpose(1, 2)
    rot = bb.rotary(grid_positions(2, 4, 4))
    same = bb.run_blocks(seq, torch.full((2, 32), 500.0), text, rot).hidden
    mixed = torch.full((2, 32), 500.0)
    mixed[:, :16] = 0.0
    assert (bb.run_blocks(seq, mixed, text, rot).hidden[:, 16:] - same[:, 16:]).abs().max() > 1e-3
    # the causal baseline: a later frame does not reach an earlier one; a full mask is bidirectional
    later = chunk.clone()
    later[:, :, 1] += 3.0
    causal = Window(**{**base.__dict__, "attention": "causal"})
    out_causal, out_later = world(causal), world(Window(**{**causal.__dict__, "chunk": later}))
    torch.testing.assert_close(out_later[:, :, :1], out_causal[:, :, :1], rtol=1e-5, atol=1e-5)
    assert (out_later[:, :, 1] - out_causal[:, :, 1]).abs().max() > 1e-3
    t = torch.full((2, 32), 300.0)
    full = bb.run_blocks(seq, t, text, rot, attention_mask=torch.ones(32, 32, dtype=torch.bool)).hidden
    torch.testing.assert_close(full, bb.run_blocks(seq, t, text, rot).hidden, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_video_stream_and_not_the_audio_stream():
    world = ltx_world()
    activate_controls(world, 0.02)
    bb = world.backbone
    g = torch.Generator().manual_seed(2)
    window = Window(text=bb.encode_text(["a room", ""]), chunk=torch.randn(2, 48, 2, 8, 8, generator=g),
                    timestep=torch.tensor([500.0, 200.0]), history=torch.randn(2, 48, 2, 8, 8, generator=g),
                    camera=random_camera(2, 4))
    world(window).pow(2).mean().backward()
    for name, module in world.controls.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    tr = bb.transformer
    blk = tr.transformer_blocks[1]
    for module in (tr.proj_in, tr.time_embed, tr.prompt_adaln, blk.attn1, blk.attn2, blk.ff, tr.proj_out):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module
    for param in (tr.scale_shift_table, blk.scale_shift_table, blk.prompt_scale_shift_table):
        assert param.grad.abs().sum() > 0
    # the audio stream and the audio-video cross-attention take no part in the video's output
    audio = [p for name, p in tr.named_parameters() if "audio" in name or name.startswith("av_cross_attn")]
    assert audio and all(p.grad is None for p in audio)


@pytest.mark.parametrize("name, options", [("framepack", {"layout": [[1, 1], [2, 2]]}),
                                           ("packforcing", {})])
def test_compressors_derive_their_kernels_from_the_linear_patchifier(name, options):
    world = ltx_world(name, options)
    activate_controls(world, 0.05)
    check_compressed_window(world)


def test_gan_reads_the_video_stream_and_the_speed_options():
    from biwm.core.protocols import AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder
    from biwm.losses.gan import GAN, GANOptions

    world = ltx_world()
    bb = world.backbone
    for capability in (AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder):
        assert isinstance(bb, capability)
    gan = GAN(GANOptions(hidden=16, registers=2), backbone=bb)
    g = torch.Generator().manual_seed(0)
    window = Window(text=bb.encode_text(["", ""]), chunk=torch.randn(2, 48, 2, 8, 8, generator=g),
                    timestep=torch.tensor([300.0, 300.0]), history=torch.randn(2, 48, 2, 8, 8, generator=g))
    logits = gan.logits(world, window)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert gan.registers.grad.abs().sum() > 0 and bb.transformer.transformer_blocks[0].ff.net[0].proj.weight.grad.abs(
    ).sum() > 0
    auto = world(window)
    bb.set_attention_kernel("math")
    torch.testing.assert_close(world(window), auto, rtol=1e-5, atol=1e-5)


def test_text_encoder_caches_prompts_and_checks_the_encoder_name():
    from biwm.core.text import TextConditioning

    bb = ltx_backbone()
    calls = []
    bb.text_encoder.gemma.register_forward_hook(lambda _m, inputs, _o: calls.append(list(inputs[0])))
    text = bb.encode_text(["a room", ""])
    assert text.names == ("gemma",) and text["gemma"].embeds.shape[2] == 256
    again = bb.encode_text(["", "a room"])
    assert len(calls) == 1 and torch.equal(again.select(1)["gemma"].embeds, text.select(0)["gemma"].embeds)
    with pytest.raises(ValueError, match="expected only 'gemma'"):
        bb.run_blocks(torch.zeros(1, 16, 256), torch.zeros(1, 16),
                      TextConditioning.from_tensor(torch.zeros(1, 2, 256), "t5"), bb.rotary(grid_positions(1, 4, 4)))


def test_gemma_and_the_text_connectors_load_once_from_a_weights_folder(tmp_path):
    """The real text path at toy size: a Gemma 3, its tokenizer and LTX-2.3-style connectors saved in a
    diffusers-format folder, loaded once in text_dtype, encoded by the pipeline's own prompt encoding."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

    from biwm.backbones.common import load_text_encoders_once
    from biwm.backbones.ltx import LTXTextEncoder

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "room"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    gemma = Gemma3Config(text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, sliding_window=8),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8), mm_tokens_per_image=4)
    Gemma3ForConditionalGeneration(gemma).save_pretrained(tmp_path / "text_encoder")
    LTX2TextConnectors(caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                       video_connector_attention_head_dim=16, video_connector_num_layers=1,
                       video_connector_num_learnable_registers=8, audio_connector_num_attention_heads=2,
                       audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                       audio_connector_num_learnable_registers=8, rope_type="split", per_modality_projections=True,
                       video_hidden_dim=32, audio_hidden_dim=16, proj_bias=True).save_pretrained(tmp_path / "connectors")

    encoder = load_text_encoders_once("ltx", tmp_path, torch.bfloat16, LTXTextEncoder.from_weights)
    assert load_text_encoders_once("ltx", tmp_path, torch.bfloat16, LTXTextEncoder.from_weights) is encoder
    assert next(encoder.gemma.gemma.parameters()).dtype == torch.bfloat16
    encoder.gemma.max_length = 16
    text = encoder(["a red room", ""])
    enc = text["gemma"]
    # the connectors' video stream: their width, the registers filling the padding (every token real)
    assert text.names == ("gemma",) and enc.embeds.shape == (2, 16, 32) and enc.embeds.dtype == torch.float32
    assert enc.mask.all() and torch.isfinite(enc.embeds).all()
    assert (enc.embeds[0] - enc.embeds[1]).abs().max() > 0


def test_vae_codec_normalises_latents_and_streams_chunk_by_chunk():
    from diffusers import AutoencoderKLLTX2Video

    from biwm.backbones.ltx import LTX_23_VAE, LTXVAECodec

    torch.manual_seed(0)
    # LTX-2.3's VAE layout (decoder not causal, 32x spatial, 8x temporal) at toy width
    vae = AutoencoderKLLTX2Video(**{**LTX_23_VAE, "block_out_channels": (8, 16, 32, 32), "latent_channels": 8,
                                    "decoder_block_out_channels": (8, 16, 16, 32), "layers_per_block": (1,) * 5,
                                    "decoder_layers_per_block": (1,) * 5})
    with torch.no_grad():
        vae.latents_mean.normal_()
        vae.latents_std.uniform_(0.5, 2.0)
    codec = LTXVAECodec(vae.eval(), decode_context=8)
    frames = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    latents = codec.encode(frames)
    assert latents.shape == (1, 8, 2, 2, 2)  # 1 + 8 (2 - 1) frames, 32x spatial
    raw = vae.encode(frames).latent_dist.mode()
    torch.testing.assert_close(latents * vae.latents_std.view(1, -1, 1, 1, 1) + vae.latents_mean.view(1, -1, 1, 1, 1),
                               raw, rtol=1e-5, atol=1e-5)
    z = torch.randn(1, 8, 3, 2, 2)
    full = codec.decode(z)
    assert full.shape == (1, 3, 17, 64, 64)
    stream = codec.stream_decoder()
    pieces = [stream.decode(z[:, :, :2]), stream.decode(z[:, :, 2:])]
    assert [p.shape[2] for p in pieces] == [9, 8]
    # the decoder is not causal: the last chunk is what decoding the whole rollout gives
    torch.testing.assert_close(pieces[1], full[:, :, 9:], rtol=1e-5, atol=1e-5)


def test_weights_folder_errors_name_the_missing_parts_and_the_wrong_shape(tmp_path):
    from pydantic import ValidationError
    from test_defects import wan_folder as diffusers_folder  # a transformer config + empty weights files

    from biwm.backbones.ltx import PRESETS, LTXOptions

    published = PRESETS["ltx-2.3-22b"]["transformer"]
    folder = diffusers_folder(tmp_path / "a", published, parts=("text_encoder", "tokenizer"), weights_file=True)
    with pytest.raises(ValidationError, match="has no vae/, connectors/") as err:
        LTXOptions(preset="ltx-2.3-22b", weights=str(folder))
    assert "random_init" in str(err.value)
    wrong = diffusers_folder(tmp_path / "b", {**published, "num_layers": 28, "cross_attn_mod": False},
                             parts=("vae", "text_encoder", "tokenizer", "connectors"), weights_file=True)
    with pytest.raises(ValidationError, match="num_layers is 28, expected 48; cross_attn_mod is False, expected True"):
        LTXOptions(preset="ltx-2.3-22b", weights=str(wrong))
    with pytest.raises(ValidationError, match="needs a local diffusers-format directory"):
        LTXOptions(preset="ltx-2.3-22b")
    options = LTXOptions(preset="ltx-2.3-22b", weights=str(folder), random_init=True)
    assert options.missing_parts() == ["vae", "connectors"]
    assert options.frame_geometry() == (8, 32)


def test_published_preset_builds_the_release_shape_on_the_meta_device():
    """LTX-2.3 as diffusers converts it: a 19.0B transformer and 3.2B of text connectors (22B), built without
    memory."""
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    from biwm.backbones.ltx import PRESETS

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**PRESETS["ltx-2.3-22b"]["transformer"])
        connectors = LTX2TextConnectors(**PRESETS["ltx-2.3-22b"]["connectors"])
    params = sum(p.numel() for p in model.parameters())
    text = sum(p.numel() for p in connectors.parameters())
    assert 18.9e9 < params < 19.1e9 and 21.9e9 < params + text < 22.4e9, (params, text)
    assert model.config.in_channels == 128 and len(model.transformer_blocks) == 48
    # the whole backbone at that size with random weights (random_init), as the benchmarks build it
    from biwm.backbones.ltx import LTXOptions, build_ltx

    with torch.device("meta"):
        bb = build_ltx(LTXOptions(preset="ltx-2.3-22b", random_init=True, dtype="bfloat16"))
    assert (bb.latent_channels, bb.patch_size, bb.spatial_factor, bb.temporal_factor) == (128, (1, 1, 1), 32, 8)
    assert bb.dtype == torch.bfloat16 and bb.hidden_dim == 4096
    assert bb.random_parts == ["transformer", "VAE", "Gemma 3 text encoder (a byte stand-in)",
                               "LTX-2 text connectors (a byte stand-in)"]


def test_list_plugins_shows_ltx():
    from conftest import biwm_cmd

    rows = json.loads(subprocess.run(biwm_cmd() + ["list-plugins", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    names = {r["name"] for r in rows if r["kind"] == "backbone"}
    assert {"wan", "hunyuan", "ltx"} <= names


def test_the_backbones_recipe_runs_finetune_distill_and_evaluate_for_ltx_tiny(tmp_path):
    """examples/backbones.yaml with only model.backbone changed (scripts/compare_backbones.py), at a few
    steps: stage 1, stage 2 and the evaluation all run for the tiny LTX-2.3."""
    from conftest import backbones_recipe_smoke_run

    backbones_recipe_smoke_run(tmp_path, "ltx")
