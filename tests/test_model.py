"""The Wan adapter, the window engine, stage-1 learning and rollout, on tiny random models."""

import pytest
import torch

from biwm.core.camera import CameraTrack, actions_to_poses, default_intrinsics
from biwm.core.protocols import grid_positions
from biwm.core.window import Window, WorldModel


def tiny_backbone(layers: int = 2, seed: int = 0):
    from biwm.backbones.wan import WanOptions, build_wan

    torch.manual_seed(seed)
    return build_wan(WanOptions(preset="tiny", overrides={"num_layers": layers}))


def tiny_world(controls=("actions", "plucker"), max_frames=4, seed=0):
    from biwm.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    bb = tiny_backbone(seed=seed)
    ctrl = {name: pm.create("control", name, {}, backbone=bb) for name in controls}
    comp = pm.create("compressor", "none", {"max_frames": max_frames}, backbone=bb)
    return WorldModel(bb, ctrl, comp)


def random_camera(batch: int, frames: int, seed: int = 0) -> CameraTrack:
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, 81, (batch, frames), generator=g)
    return CameraTrack(actions_to_poses(actions), default_intrinsics(75.0, batch=batch), actions)


def activate_controls(world, std: float) -> None:
    """Give the zero-initialised control projections weights, so control has an effect."""
    for control in world.controls.values():
        torch.nn.init.normal_(next(iter(control.project.parameters())), std=std)


def random_window(world, chunk_frames: int, history_frames: int, t: float, **fields) -> Window:
    """A batch-2 window of random latents with a random camera over history + chunk."""
    text = world.backbone.encode_text(["", ""])
    return Window(text=text, chunk=torch.randn(2, 48, chunk_frames, 8, 8), timestep=torch.tensor([t, t]),
                  history=torch.randn(2, 48, history_frames, 8, 8),
                  camera=random_camera(2, chunk_frames + history_frames), **fields)


def stock_forward(bb, x, t, text):
    """diffusers' own forward, with diffusers' own attention processors (the adapter installs its own in
    the self-attentions), given the embeddings as Wan's pipeline gives them (zero past each prompt)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    enc = text[bb.TEXT_ENCODER]
    ours = [block.attn1.processor for block in bb.transformer.blocks]
    for block in bb.transformer.blocks:
        block.attn1.processor = WanAttnProcessor()
    try:
        return bb.transformer(x, t, enc.embeds * enc.mask[..., None]).sample
    finally:
        for block, processor in zip(bb.transformer.blocks, ours):
            block.attn1.processor = processor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_attention_processor_equals_diffusers_bitwise(dtype):
    """The adapter's self-attention (rotary as one stack of rotated pairs) computes what diffusers'
    WanAttnProcessor computes, bit for bit, with and without a mask; gradients too."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    bb = tiny_backbone()
    attn = bb.transformer.blocks[0].attn1.to(dtype)
    ours = attn.processor
    assert ours.__class__.__name__ == "MaskableWanAttnProcessor"
    x = torch.randn(2, 48, attn.inner_dim, dtype=dtype)
    rot = bb.rotary(grid_positions(3, 4, 4))
    mask = torch.rand(48, 48) > 0.3
    mask |= torch.eye(48, dtype=torch.bool)
    for m in (None, mask):
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = ours(attn, x1, None, m, rot)
        ref = WanAttnProcessor()(attn, x2, None, m, rot)
        assert torch.equal(got, ref)
        got.float().square().sum().backward()
        ref.float().square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_adapter_equals_stock_diffusers_forward():
    bb = tiny_backbone()
    x = torch.randn(2, 48, 3, 8, 8)
    t = torch.tensor([731.0, 12.0])
    text = bb.encode_text(["a room", ""])
    tokens = bb.patch_embed(x)
    grid = tuple(tokens.shape[2:])
    seq = tokens.flatten(2).transpose(1, 2)
    out = bb.run_blocks(seq, t[:, None].expand(2, seq.shape[1]), text, bb.rotary(grid_positions(grid[0], *grid[1:])))
    ours = bb.unembed(out, grid)
    ref = stock_forward(bb, x, t, text)
    assert ours.shape == ref.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_world_model_without_history_and_control_equals_stock_forward():
    world = tiny_world()
    bb = world.backbone
    x = torch.randn(2, 48, 2, 8, 8)
    t = torch.tensor([400.0, 900.0])
    text = bb.encode_text(["", ""])
    # zero-initialised controls: a camera changes nothing before training
    out = world(Window(text=text, chunk=x, timestep=t, camera=random_camera(2, 2)))
    torch.testing.assert_close(out, stock_forward(bb, x, t, text), rtol=1e-5, atol=1e-5)


def test_rotary_at_integer_positions_matches_diffusers_and_is_continuous():
    bb = tiny_backbone()
    pos = grid_positions(3, 4, 4)
    cos, sin = bb.rotary(pos)
    ref_cos, ref_sin = bb.transformer.rope(torch.zeros(1, 48, 3, 8, 8))
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    half = bb.rotary(torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64))[0]
    lo, hi = cos[0, 0, 0], cos[0, 16, 0]  # frames 0 and 1 at row 0, col 0
    assert torch.all(half[0, 0, 0] <= torch.maximum(lo, hi) + 1e-6)
    assert torch.all(half[0, 0, 0] >= torch.minimum(lo, hi) - 1e-6)


def test_per_token_timesteps_change_only_through_the_timestep():
    bb = tiny_backbone()
    x = torch.randn(1, 48, 2, 8, 8)
    text = bb.encode_text([""])
    seq = bb.patch_embed(x).flatten(2).transpose(1, 2)
    rot = bb.rotary(grid_positions(2, 4, 4))
    same = bb.run_blocks(seq, torch.full((1, 32), 500.0), text, rot).hidden
    mixed_t = torch.full((1, 32), 500.0)
    mixed_t[:, :16] = 0.0
    mixed = bb.run_blocks(seq, mixed_t, text, rot).hidden
    assert not torch.allclose(same, mixed)


def test_history_and_control_reach_the_output_and_gradients_flow():
    world = tiny_world()
    activate_controls(world, 0.02)
    bb = world.backbone
    base = random_window(world, chunk_frames=2, history_frames=3, t=500.0)
    chunk, history = base.chunk, base.history
    out = world(base)
    assert out.shape == chunk.shape
    other_history = history.clone()
    other_history[:, :, -1] += 1.0
    assert not torch.allclose(out, world(Window(**{**base.__dict__, "history": other_history})))
    other_cam = random_camera(2, 5, seed=1)
    assert not torch.allclose(out, world(Window(**{**base.__dict__, "camera": other_cam})))
    # control dropped for CFG: sample 0 keeps control, sample 1 drops it
    dropped = world(Window(**{**base.__dict__, "control_mask": torch.tensor([1.0, 0.0])}))
    torch.testing.assert_close(dropped[0], out[0])
    no_control = world(Window(**{**base.__dict__, "camera": None}))
    torch.testing.assert_close(dropped[1], no_control[1], rtol=1e-5, atol=1e-5)
    out.pow(2).mean().backward()
    for name, module in world.controls.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert bb.transformer.patch_embedding.weight.grad.abs().sum() > 0


def test_compressor_none_keeps_last_frames():
    world = tiny_world(max_frames=2)
    comp = world.compressor
    assert comp.frames_needed(5) == slice(3, 5)
    assert comp.frames_needed(1) == slice(0, 1)
    assert comp.token_budget(100, (4, 4)) == comp.token_budget(3, (4, 4)) == 2 * 16
    bb = world.backbone
    hist = comp.compress(torch.randn(1, 48, 2, 8, 8), torch.tensor([3, 4]), None, bb)
    assert hist.tokens.shape == (1, 32, bb.hidden_dim)
    assert hist.positions[:, 0].unique().tolist() == [3.0, 4.0]


def test_stage1_loss_falls_on_a_fixed_batch():
    from biwm.core.schedule import add_noise, velocity_target

    world = tiny_world()
    bb = world.backbone
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 48, 2, 8, 8, generator=g) * 2 - 1
    history = torch.rand(2, 48, 2, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.3, 0.7])
    window = Window(text=bb.encode_text(["", ""]), chunk=add_noise(x0, noise, sigma), timestep=sigma * 1000,
                    history=history, camera=random_camera(2, 4))
    opt = torch.optim.AdamW(world.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(world(window), velocity_target(x0, noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_rollout_shapes_and_actions_change_output():
    from biwm.core.rollout import rollout

    world = tiny_world()
    activate_controls(world, 0.05)
    bb = world.backbone
    text = bb.encode_text(["", ""])
    null = bb.encode_text([""])
    history = torch.randn(2, 48, 2, 8, 8)
    cam_a = random_camera(2, 2 + 3 * 2, seed=0)
    cam_b = random_camera(2, 2 + 3 * 2, seed=5)

    def run(cam, cfg_scale=1.0):
        seen = []
        out = rollout(world, text, null, history, cam, chunks=3, chunk_frames=2, steps=3, shift=3.0,
                      cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(0),
                      on_chunk=lambda i, x: seen.append((i, tuple(x.shape))))
        return out, seen

    a, seen = run(cam_a)
    assert a.shape == (2, 48, 6, 8, 8)
    assert seen == [(0, (2, 48, 2, 8, 8)), (1, (2, 48, 2, 8, 8)), (2, (2, 48, 2, 8, 8))]
    torch.testing.assert_close(run(cam_a)[0], a)  # deterministic for a seed
    b, _ = run(cam_b)
    assert (a - b).abs().mean() > 1e-3
    guided, _ = run(cam_a, cfg_scale=3.0)
    assert guided.shape == a.shape and not torch.allclose(guided, a)
    frames = bb.decode_video(a)
    assert frames.shape == (2, 3, 6, 32, 32) and frames.min() >= -1 and frames.max() <= 1


def test_pixel_codec_is_lossless_and_streams():
    bb = tiny_backbone()
    video = torch.randint(0, 256, (1, 3, 5, 32, 32)).float() / 127.5 - 1
    lat = bb.encode_video(video)
    assert lat.shape == (1, 48, 5, 8, 8)
    torch.testing.assert_close(bb.decode_video(lat), video)
    dec = bb.stream_decoder()
    torch.testing.assert_close(torch.cat([dec.decode(lat[:, :, :2]), dec.decode(lat[:, :, 2:])], 2), video)


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"])
def test_real_presets_need_weights(preset):
    from pydantic import ValidationError

    from biwm.backbones.wan import WanOptions

    with pytest.raises(ValidationError, match="needs a local diffusers-format directory"):
        WanOptions(preset=preset)


def test_causal_window_blocks_information_from_later_frames():
    world = tiny_world()
    activate_controls(world, 0.05)
    window = random_window(world, chunk_frames=3, history_frames=2, t=600.0, attention="causal")
    chunk = window.chunk
    out = world(window)
    later = chunk.clone()
    later[:, :, 2] += 3.0  # perturb the last chunk frame
    out_later = world(Window(**{**window.__dict__, "chunk": later}))
    torch.testing.assert_close(out_later[:, :, :2], out[:, :, :2], rtol=1e-5, atol=1e-5)
    assert (out_later[:, :, 2] - out[:, :, 2]).abs().max() > 1e-3
    # bidirectional: the same perturbation reaches the earlier frames
    bidir = Window(**{**window.__dict__, "attention": "bidirectional"})
    bidir_later = Window(**{**bidir.__dict__, "chunk": later})
    assert (world(bidir_later)[:, :, :2] - world(bidir)[:, :, :2]).abs().max() > 1e-3
    # the mode belongs to the model: a causal model's windows without a mode of their own are causal,
    # and a window may still override it
    unset = Window(**{**window.__dict__, "attention": None})
    world.attention = "causal"
    torch.testing.assert_close(world(unset), out, rtol=0, atol=0)
    assert (world(bidir) - out).abs().max() > 1e-3
    world.attention = "bidirectional"
    torch.testing.assert_close(world(unset), world(bidir), rtol=0, atol=0)


def test_the_recipe_gives_the_model_its_attention(tmp_path):
    from conftest import tiny_recipe

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext

    data = tiny_recipe(tmp_path / "run")
    for mode in ("bidirectional", "causal"):
        recipe = validate_recipe({**data, "model": {**data["model"], "attention": mode}})
        assert RunContext(recipe=recipe, run_dir=tmp_path / "run").build_world_model().attention == mode


def test_wan_vae_stream_decoder_equals_full_decode():
    from diffusers import AutoencoderKLWan

    from biwm.backbones.wan import WanVAECodec

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    codec = WanVAECodec(vae.eval())
    latents = torch.randn(1, 4, 5, 4, 4)
    full = codec.decode(latents)
    assert full.shape == (1, 3, 17, 32, 32)  # 1 + 4 * (5 - 1) frames, 8x spatial
    stream = codec.stream_decoder()
    pieces = [stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:3]), stream.decode(latents[:, :, 3:])]
    assert [p.shape[2] for p in pieces] == [1, 8, 8]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=1e-4, atol=1e-4)


def test_the_backbone_owns_the_timestep_convention():
    """Samplers, training and the history's noise level all ask the backbone for its timestep of a
    noise level: a backbone with another convention gets its own numbers everywhere."""
    from biwm.core.sampling import Sampler
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss
    from biwm.core.window import noise_history

    world = tiny_world()
    activate_controls(world, 0.05)
    assert torch.equal(world.backbone.timestep(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))  # Wan
    world.backbone.timestep = lambda sigma: 7.0 * sigma  # another convention
    seen, blocks = [], []
    forward, run_blocks = world.forward, world.backbone.run_blocks
    world.forward = lambda w: (seen.append(w.timestep.clone()), forward(w))[1]
    world.backbone.run_blocks = lambda tokens, t, *a, **k: (blocks.append(t.clone()), run_blocks(tokens, t, *a, **k))[1]
    window = random_window(world, chunk_frames=2, history_frames=2, t=0.0)
    Sampler(3, 1.0, 1.0).sample_chunk(world, window, window.text.select(0), torch.Generator().manual_seed(0))
    assert torch.allclose(torch.stack(seen)[:, 0], 7.0 * torch.tensor([1.0, 2 / 3, 1 / 3]))  # shift 1: linear
    seen.clear(), blocks.clear()
    world(noise_history(window.with_chunk(window.chunk, torch.zeros(2)), torch.tensor([0.5, 0.5]),
                        torch.zeros_like(window.history)))
    assert torch.allclose(blocks[0][:, 0], torch.full((2,), 3.5))  # the history's level, in the same convention
    seen.clear()
    cfg = FinetuneConfig(no_history_prob=0.0, control_dropout=0.0, text_dropout=0.0)
    x0, history = window.chunk, window.history
    finetune_loss(world, cfg, x0, history, window.camera, window.text, window.text.select(0),
                  torch.Generator().manual_seed(1))
    assert len(seen) == 1 and bool(((seen[0] >= 0) & (seen[0] <= 7.0)).all()) and float(seen[0].max()) > 1.0
