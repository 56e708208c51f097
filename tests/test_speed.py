"""Speed options (biwm.core.speed), the fp8 quantizer (biwm-quant) and the sync-free rollout.

CPU tests check the numerics and the inline paths; tests marked ``requires_gpu`` check on a GPU
that the overlapped stream, compiled blocks and torchao FP8 give the same results as the plain
path and that a rollout never synchronises with the host."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import requires_gpu


def tiny_world(device="cpu", dtype="float32", compressor="framepack", layers=2):
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.window import WorldModel

    pm = get_plugin_manager()
    torch.manual_seed(0)
    bb = pm.get("backbone", "wan").create({"preset": "tiny", "dtype": dtype, "overrides": {"num_layers": layers}})
    controls = {n: pm.get("control", n).create({}, backbone=bb) for n in ("actions", "plucker")}
    for c in controls.values():  # give the zero-initialised projections a value so control matters
        torch.nn.init.normal_(c.project.weight, std=0.02)
    world = WorldModel(bb, controls, pm.get("compressor", compressor).create({}, backbone=bb))
    return world.to(device).eval().requires_grad_(False)


def camera_for(latent_frames, device="cpu"):
    from biwm.core.camera import CameraTrack, actions_to_poses, default_intrinsics, parse_keys

    actions = parse_keys("w*3,wd*4,j*3,a*6,l*4,s*20")[:latent_frames][None].contiguous()
    return CameraTrack(actions_to_poses(actions), default_intrinsics(60.0), actions).to(device)


def rollout_inputs(world, device, chunks=3):
    """Text, null text, empty history, camera and sigmas on ``device``, made before the rollout
    (so the rollout itself copies nothing from the host)."""
    from biwm.core.dmd import student_sigmas

    bb = world.backbone
    return (bb.encode_text(["a room"]).to(device), bb.encode_text([""]).to(device),
            torch.zeros(1, bb.latent_channels, 0, 8, 8, device=device), camera_for(chunks * 2, device),
            student_sigmas(2, 5.0, device))


def roll(world, device, generator, chunks=3, on_chunk=None, inputs=None):
    from biwm.core.rollout import rollout

    text, null, empty, camera, sigmas = inputs or rollout_inputs(world, device, chunks)
    return rollout(world, text, null, empty, camera, chunks, 2, 2, 5.0, generator=generator, on_chunk=on_chunk,
                   student_sigmas=sigmas)


# ------------------------------------------------------------------------------------------- CPU


def test_frame_stream_inline_gives_uint8_frames_of_each_chunk_in_order():
    from biwm.core.speed import FrameStream
    from biwm.core.video import as_uint8

    world = tiny_world()
    stream = FrameStream(world.backbone.stream_decoder(), torch.device("cpu"), overlap=True)  # no CUDA: inline
    assert not stream.overlap
    latents = roll(world, "cpu", torch.Generator().manual_seed(0), on_chunk=lambda i, x: stream.submit(x))
    got = stream.ready()
    assert len(got) == 3 and stream.ready() == [] and stream.finish() == []
    frames = torch.cat(got, dim=1)  # [B, T, H, W, 3]
    expected = as_uint8(world.backbone.decode_video(latents)).permute(0, 2, 3, 4, 1)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 6, 32, 32, 3)
    assert torch.equal(frames, expected)


def test_rollout_noise_is_reproducible_per_seed_with_a_cpu_generator():
    world = tiny_world()
    a = roll(world, "cpu", torch.Generator().manual_seed(3))
    b = roll(world, "cpu", torch.Generator().manual_seed(3))
    c = roll(world, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_relative_camera_uses_the_same_inverse_as_linalg_inv():
    from biwm.core.window import relative_to_frame

    cam = camera_for(6)
    rel = relative_to_frame(cam, 2)
    torch.testing.assert_close(rel.c2w, torch.linalg.inv(cam.c2w[:, 2:3]) @ cam.c2w)
    torch.testing.assert_close(rel.c2w[:, 2], torch.eye(4)[None], atol=1e-6, rtol=0)


def test_fp8_emulation_rounds_weights_and_activations_to_e4m3():
    from biwm.core.plugins import get_plugin_manager
    from biwm.quant.fp8 import E4M3_MAX, round_e4m3

    world = tiny_world()
    blocks = world.backbone.trainable().blocks
    before = blocks[0].ffn.net[0].proj.weight.clone()
    window = _window(world)
    ref = world(window)
    q = get_plugin_manager().get("quantizer", "fp8").create({})
    with pytest.warns(UserWarning, match="emulating FP8"):
        q.convert(world.backbone.trainable(), training=False)
    w = blocks[0].ffn.net[0].proj.weight
    # each row is its absmax/448 times an e4m3 number, and the weight moved by at most e4m3's rounding:
    # half a step of 3 mantissa bits (2^-4 relative), or half the subnormal step (2^-10 x scale) near zero
    scale = before.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    torch.testing.assert_close((w / scale).to(torch.float8_e4m3fn).float() * scale, w)
    assert not torch.equal(w, before)
    bound = torch.maximum(before.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
    assert ((w - before).abs() <= bound).all()
    torch.testing.assert_close(round_e4m3(w, dim=1), w)  # idempotent
    out = world(window)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.05, err
    # only the blocks' linears: the patch embedding and the condition embedder are untouched
    assert not hasattr(world.backbone.trainable().condition_embedder.time_proj, "fp8_per_row")


def test_fp8_errors_name_what_is_wrong():
    from biwm.core.plugins import get_plugin_manager

    spec = get_plugin_manager().get("quantizer", "fp8")
    world = tiny_world()
    for training in (True, False):  # training: torchao float8 training (tests/test_quant_fp8_training.py)
        with pytest.raises(ValueError, match="no linear layer under 'nothing.'"):
            spec.create({"modules": "nothing."}).convert(world.backbone.trainable(), training=training)
    with pytest.raises(RuntimeError, match="no FP8 GEMMs"):
        spec.create({"emulate": "never"}).convert(world.backbone.trainable(), training=False)
    with pytest.raises(Exception, match="granularity"):
        spec.create({"granularity": "block"})


def test_speed_options_apply_quantizer_and_reject_unknown_fields():
    from biwm.core.speed import SpeedOptions, apply_speedups
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compiled"):
        SpeedOptions(compiled=True)
    world = tiny_world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_speedups(world, SpeedOptions(quantize={"name": "fp8"}))
    assert getattr(world.backbone.trainable().blocks[1].attn1.to_q, "fp8_per_row", False)
    assert "quantize fp8" in SpeedOptions(quantize={"name": "fp8"}).describe()


def _window(world, device="cpu", history=6):
    from biwm.core.window import Window

    torch.manual_seed(1)
    c = world.backbone.latent_channels
    return Window(text=world.backbone.encode_text(["a room"]).to(device),
                  chunk=torch.randn(1, c, 2, 8, 8, device=device), timestep=torch.full((1,), 600.0, device=device),
                  history=torch.randn(1, c, history, 8, 8, device=device), camera=camera_for(history + 2, device))


def small_wan_codec():
    from biwm.backbones.wan import WanVAECodec
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return WanVAECodec(vae)


def stream_decode(codec, chunks):
    decoder = codec.stream_decoder()
    with torch.no_grad():
        return torch.cat([decoder.decode(z) for z in chunks], dim=2)


def test_channels_last_decoder_gives_the_same_frames():
    codec = small_wan_codec()
    chunks = [torch.randn(1, 4, 2, 6, 8) for _ in range(3)]
    ref = stream_decode(codec, chunks)
    codec.channels_last_decoder()
    convs = [m for m in codec.vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    assert not codec.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    out = stream_decode(codec, chunks)
    assert out.shape == (1, 3, 1 + 4 * 5, 48, 64)  # causal VAE: 1 + 4 (T - 1) frames, 8x spatial
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch < 2.13 graph-breaks on diffusers' tensor == 'Rep' comparison in WanResample")
def test_compiled_decoder_has_one_graph_per_cache_state_and_no_graph_break():
    import torch._dynamo
    from torch._dynamo.utils import counters

    codec = small_wan_codec()
    chunks = [torch.randn(1, 4, 2, 6, 8) for _ in range(3)]
    ref = stream_decode(codec, chunks)
    torch._dynamo.reset()
    counters.clear()
    codec.compile_decoder(backend="eager", dynamic=False)
    try:
        first, second = stream_decode(codec, chunks), stream_decode(codec, chunks)
    finally:
        torch._dynamo.reset()
    # first latent frame, second, and every later one: three graphs for any number of rollouts
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, ref, atol=1e-5, rtol=1e-4)


def test_backbone_speed_methods_are_required_only_when_asked():
    from types import SimpleNamespace

    from biwm.core.speed import SpeedOptions, apply_speedups

    world = SimpleNamespace(backbone=SimpleNamespace(trainable=lambda: torch.nn.Linear(2, 2)))
    assert apply_speedups(world, SpeedOptions()) is world
    with pytest.raises(ValueError, match=r"channels_last_decoder: the SimpleNamespace backbone has no "
                                         r"channels_last_decoder\(\)"):
        apply_speedups(world, SpeedOptions(channels_last_decoder=True))
    tiny = tiny_world()  # the pixel codec of the tiny preset has nothing to convert: a no-op
    window = _window(tiny)
    ref = tiny(window)
    apply_speedups(tiny, SpeedOptions(channels_last_decoder=True))
    torch.testing.assert_close(tiny(window), ref)
    with pytest.raises(ValueError, match="SimpleNamespace backbone cannot choose an attention kernel"):
        apply_speedups(world, SpeedOptions(attention="flash"))
    with pytest.raises(ValueError, match="attention kernel 'fast': expected one of auto, flash"):
        tiny.backbone.set_attention_kernel("fast")
    # the Wan backbone declares every optional capability through its protocol
    from biwm.core.protocols import AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder

    for capability in (AttentionKernelChoice, BlockAccess, ChannelsLastDecoder, CompilableDecoder):
        assert isinstance(tiny.backbone, capability) and not isinstance(world.backbone, capability)


def test_biwm_core_imports_no_diffusers_and_no_backbone():
    """The core declares no diffusers dependency: importing every core module must not pull it in
    (backbone plugins do, when the plugin manager loads them)."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, biwm.core as c\n"
            "for m in pkgutil.walk_packages(c.__path__, 'biwm.core.'): importlib.import_module(m.name)\n"
            "print(sorted({k.split('.')[0] for k in sys.modules if k.startswith(('diffusers', 'biwm.backbones'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- GPU


@requires_gpu
def test_gpu_rollout_with_cuda_generator_never_synchronises_and_overlap_matches_inline():
    from biwm.core.speed import FrameStream

    device = torch.device("cuda")
    world = tiny_world(device, "bfloat16")
    inline = FrameStream(world.backbone.stream_decoder(), device, overlap=False)
    ref = roll(world, device, torch.Generator(device).manual_seed(0), on_chunk=lambda i, x: inline.submit(x))
    overlapped = FrameStream(world.backbone.stream_decoder(), device, overlap=True)
    inputs = rollout_inputs(world, device)
    generator = torch.Generator(device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = roll(world, device, generator, on_chunk=lambda i, x: overlapped.submit(x), inputs=inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    got = overlapped.finish()
    want = inline.finish()
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a.is_pinned() and torch.equal(a, b)


@requires_gpu
def test_gpu_compiled_blocks_match_eager():
    from biwm.core.speed import SpeedOptions, apply_speedups

    world = tiny_world("cuda", "bfloat16")
    window = _window(world, "cuda")
    with torch.no_grad():
        ref = world(window)
        apply_speedups(world, SpeedOptions(compile=True))
        out = world(window)
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


@requires_gpu
def test_gpu_channels_last_compiled_decoder_is_as_close_to_fp32_as_eager_bf16():
    import torch._dynamo

    chunks = [torch.randn(1, 4, 2, 6, 8, device="cuda") for _ in range(4)]
    ref = stream_decode(small_wan_codec().cuda(), chunks)  # fp32, same weights (same seed)
    codec = small_wan_codec().to("cuda", torch.bfloat16)

    def error(out):
        return ((out.float() - ref).norm() / ref.norm()).item()

    eager = error(stream_decode(codec, chunks))
    assert 1e-4 < eager < 0.1, eager
    codec.channels_last_decoder()
    torch._dynamo.reset()
    codec.compile_decoder(dynamic=False)
    try:
        for _ in range(2):  # the second rollout runs what the first compiled
            compiled = error(stream_decode(codec, chunks))
            assert compiled < 1.5 * eager, (compiled, eager)
    finally:
        torch._dynamo.reset()


@requires_gpu
def test_gpu_fp8_through_torchao_is_close_to_bf16():
    pytest.importorskip("torchao")
    from biwm.core.plugins import get_plugin_manager

    world = tiny_world("cuda", "bfloat16")
    window = _window(world, "cuda")
    with torch.no_grad():
        ref = world(window).float()
        get_plugin_manager().get("quantizer", "fp8").create({}).convert(world.backbone.trainable(), training=False)
        assert "Float8" in type(world.backbone.trainable().blocks[0].attn1.to_q.weight).__name__
        out = world(window).float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.08, err


def test_attention_option_reaches_the_transformers_processors_only():
    from biwm.core.speed import SpeedOptions, apply_speedups

    world = tiny_world()
    window = _window(world)
    ref = world(window)
    apply_speedups(world, SpeedOptions(attention="math"))
    blocks = world.backbone.trainable().blocks
    # our maskable self-attention processor passes the dispatcher's choice to diffusers' own processor
    assert blocks[0].attn1.processor.inner._attention_backend.value == "_native_math"
    assert blocks[0].attn2.processor._attention_backend.value == "_native_math"
    torch.testing.assert_close(world(window), ref, atol=1e-5, rtol=1e-4)


def training_step_probe(device: str = "cpu"):
    """A tiny world (no compressor) in training mode, and ``loss_and_grads(history)``: one finetune
    loss on fixed latents and camera with ``history`` history frames, backpropagated; returns the loss,
    the first block's q-projection gradient and the Plücker ray encoder's gradient (``tiny_world``
    gives the zero-initialised projection weights, so that gradient is not zero)."""
    from biwm.core.camera import CameraTrack, actions_to_poses, default_intrinsics
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss

    world = tiny_world(device, compressor="none").train().requires_grad_(True)
    bb = world.backbone
    cfg = FinetuneConfig(batch_size=2, text_dropout=0.0, control_dropout=0.0)
    text, null = bb.encode_text(["a room", "a room"]).to(device), bb.encode_text([""]).to(device)
    actions = torch.randint(0, 81, (2, 10))
    camera_all = CameraTrack(actions_to_poses(actions), default_intrinsics(60.0).expand(2, 3, 3), actions).to(device)
    latents = torch.randn(2, bb.latent_channels, 10, 8, 8, device=device)

    def loss_and_grads(history: int):
        world.zero_grad(set_to_none=True)
        k = cfg.chunk_frames
        # contiguous, as sample_batch gives them
        loss = finetune_loss(world, cfg, latents[:, :, history:history + k].contiguous(),
                             latents[:, :, :history].contiguous(), camera_all.frames(slice(0, history + k)), text,
                             null, torch.Generator(device).manual_seed(history), "bidirectional")
        loss.backward()
        return (loss.detach().clone(), bb.block_modules()[0].attn1.to_q.weight.grad.clone(),
                world.controls["plucker"].encode.weight.grad.clone())

    return world, loss_and_grads


def test_training_compiled_blocks_share_one_graph_across_history_lengths_and_match_eager():
    """compile: true in finetune compiles the blocks with a symbolic token count: windows of every
    history length after the first reuse one graph (no recompile per length), and the loss and
    gradients are those of the eager model."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from biwm.core.speed import compile_blocks

    world, loss_and_grads = training_step_probe()
    lengths = (0, 2, 3, 5)
    eager = [loss_and_grads(h) for h in lengths]
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(world, dynamic=True, backend="eager")
    graphs = []
    for h, expected in zip(lengths, eager):
        got = loss_and_grads(h)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        assert got[1].abs().sum() > 0
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] >= 1, "the blocks were not compiled"
    assert graphs[-1] == graphs[1], f"graphs after each history length {graphs}: a recompile per history length"
    torch._dynamo.reset()


def compiled_world_graphs(lengths: tuple[int, ...], **compile_options) -> list[int]:
    """The tiny world's training step compiled whole (``compile_world(**compile_options)``, aot_eager) at
    each history length of ``lengths`` in turn: asserts the loss and the gradients (of the blocks and of the
    controls, which sit outside the blocks) equal the eager model's and that the state dict keeps its names;
    returns the number of graphs compiled after each length."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from biwm.core.speed import compile_world

    world, loss_and_grads = training_step_probe()
    eager = [loss_and_grads(h) for h in lengths]
    torch._dynamo.reset()
    counters.clear()
    compile_world(world, backend="aot_eager", **compile_options)
    graphs = []
    for h, expected in zip(lengths, eager):
        got = loss_and_grads(h)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
        assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    # compiled in place: the state dict's names (what checkpoints hold) are those of the plain model
    assert not any("_orig_mod" in name for name in world.state_dict())
    return graphs


def test_training_compiled_world_compiles_one_static_graph_per_history_length_and_matches_eager():
    """compile: world / world-graphs / graphs in finetune compile the whole forward with one static graph
    per history length (no recompile when a length comes back), as eager."""
    graphs = compiled_world_graphs((0, 2, 1, 2, 0), dynamic=False)  # as the stage calls it
    assert graphs == [1, 2, 3, 3, 3], f"graphs after each history length {graphs}"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BIWM_SLOW"), reason="the symbolic-shape compile (about 3 min on 2 cores): "
                    "BIWM_SLOW=1 pytest -m slow tests/test_speed.py")
def test_training_compiled_world_has_one_graph_per_history_length_and_matches_eager():
    """compile_world(dynamic=True) (not what the stage uses since 2026-12-04; kept for newer torch versions)
    compiles the whole forward with the history length symbolic: three graphs (no history, one frame,
    every longer history), as eager."""
    graphs = compiled_world_graphs((0, 2, 3, 2, 0, 1, 5), dynamic=True)
    assert graphs == [1, 2, 2, 2, 2, 3, 3], f"graphs after each history length {graphs}"


@pytest.mark.parametrize("value, called", [(True, "compile_blocks"), ("blocks", "compile_blocks"),
                                           ("world", "compile_world"), ("world-graphs", "compile_world"),
                                           ("graphs", "compile_world")])
def test_finetune_compile_option_picks_the_compiler(value, called, tmp_path, monkeypatch):
    """The stage's compile option reaches the right compiler (world: inductor, world-graphs: inductor in
    CUDA graphs, graphs: the cudagraphs backend; the last three static per history length), and a
    wrong value is refused when the recipe is validated, naming the field."""
    from pydantic import ValidationError

    import biwm.core.speed as speed
    from biwm.core.stages.finetune import FinetuneConfig

    calls = []
    monkeypatch.setattr(speed, "compile_blocks", lambda world, **kw: calls.append(("compile_blocks", kw)))
    monkeypatch.setattr(speed, "compile_world", lambda world, **kw: calls.append(("compile_world", kw)))
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    recipe = validate_recipe({
        "name": "c", "run_dir": str(tmp_path / "run"), "data": {"train_clips": 4, "frames": 9},
        "model": {"backbone": {"name": "wan", "options": {"preset": "tiny"}}, "controls": ["actions"],
                  "compressor": {"name": "none", "options": {"max_frames": 4}}},
        "stages": [{"stage": "finetune", "steps": 1, "batch_size": 2, "max_history": 4, "compile": value}]})
    run_recipe(recipe)
    assert [c[0] for c in calls] == [called]
    if value in ("world", "world-graphs", "graphs"):  # one static graph per history length
        assert calls[0][1]["dynamic"] is False
    assert calls[0][1].get("backend") == ("cudagraphs" if value == "graphs" else None)
    assert calls[0][1].get("mode") == ("reduce-overhead" if value == "world-graphs" else None)
    with pytest.raises(ValidationError, match="compile"):
        FinetuneConfig(compile="fast")


@requires_gpu
def test_gpu_cuda_graphed_world_matches_eager_over_replays():
    """compile: graphs on a GPU: the forward and backward of each history length, replayed from CUDA
    graphs after recording, give the eager loss and gradients (fp32, so the comparison is tight)."""
    import torch._dynamo

    from biwm.core.speed import compile_world

    world, loss_and_grads = training_step_probe("cuda")
    lengths = (0, 3, 0, 3, 0, 3, 0, 3)
    eager = [loss_and_grads(h) for h in lengths]
    torch._dynamo.reset()
    compile_world(world, backend="cudagraphs", dynamic=False)  # as compile: graphs
    for h, expected in zip(lengths, eager):
        for g, e in zip(loss_and_grads(h), expected):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()
