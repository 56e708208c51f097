"""biwm-losses: the GAN head and the forward-KL weighting of DMD."""

import math

import pytest
import torch

from test_distill import distill_recipe, run, tiny_world, window_for


def test_forward_kl_weights_after_normalisation():
    from biwm.losses.forward_kl import density_weights

    logits = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 50.0])
    r = torch.tensor([1.0, 3.0, 1 / 3, 20.0])  # the last: logit clamped to 10, ratio to 20
    torch.testing.assert_close(density_weights(logits, "forward-kl"), r / r.mean())
    js = r / (1 + r)
    torch.testing.assert_close(density_weights(logits, "js"), js / js.mean())
    torch.testing.assert_close(density_weights(logits, "reverse-kl"), torch.ones(4))
    low = density_weights(torch.tensor([-50.0, 0.0]), "forward-kl")  # ratio floor 0.1
    torch.testing.assert_close(low, torch.tensor([0.1, 1.0]) / 0.55)


def gan_for(world, **options):
    from biwm.losses.gan import GAN, GANOptions

    return GAN(GANOptions(**options), backbone=world.backbone)


def test_gan_head_reads_the_chosen_blocks_and_learns_to_separate():
    from biwm.core.dmd import DistillStep, RolledChunk
    from biwm.losses.gan import default_blocks

    assert default_blocks(30) == [13, 20, 29] and default_blocks(2) == [0, 1]
    world = tiny_world()
    gan = gan_for(world, hidden=32, registers=2, critic_weight=1.0)
    assert gan.blocks == [0, 1]
    with pytest.raises(ValueError, match=r"gan blocks \[5\] outside the critic's 2 blocks"):
        gan_for(world, blocks=[5])
    from types import SimpleNamespace

    from biwm.losses.gan import GAN, GANOptions

    with pytest.raises(ValueError, match="the SimpleNamespace backbone has none"):
        GAN(GANOptions(), backbone=SimpleNamespace(trainable=lambda: world.backbone.trainable()))
    win, latents, _, _ = window_for(world)
    real = RolledChunk(win.chunk, win)
    fake = RolledChunk(torch.randn(win.chunk.shape, generator=torch.Generator().manual_seed(0)), win)
    optimizer = torch.optim.Adam(gan.parameters(), lr=1e-3)
    losses = []
    for i in range(15):
        step = DistillStep(fake, world, world, None, 1.0, torch.full((2,), 0.3), 3.0,
                           torch.Generator().manual_seed(i), real=real)
        loss = gan.critic_loss(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1  # real and fake told apart
    assert gan.registers.grad is not None
    # the generator side sends a gradient into the generated chunk, through the critic
    x = fake.latents.clone().requires_grad_(True)
    step = DistillStep(RolledChunk(x, win), world, world, None, 1.0, torch.full((2,), 0.3), 3.0,
                       torch.Generator().manual_seed(0), real=real)
    gan.generator_loss(step).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_distill_with_gan_and_forward_kl(tmp_path):
    from safetensors.torch import load_file

    metrics = run(distill_recipe(tmp_path / "run", steps=4, generator_every=2,
                                 losses=["dmd", {"name": "gan", "options": {"r1_weight": 0.1}},
                                         {"name": "forward-kl", "options": {"divergence": "js"}}]))
    assert metrics["stages"]["distill"]["generator_updates"] == 2
    ckpt = load_file(str(tmp_path / "run" / "distill" / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert any(k.startswith("loss1.registers") for k in ckpt)  # the GAN head is checkpointed with the critic
