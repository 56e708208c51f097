"""The BF16-teacher -> quantised-student self-distillation term (a quantizer's ``self_distill``
weight; :mod:`biwm.core.selfdistill`) in finetune and distill.

The KL is the reference release's (softmax over the latent channels, KL(teacher || student) on the
velocity plus 0.25 x on x0); with weight 0 nothing changes, with an unquantised model the term is
exactly 0, with a quantised one it is positive and its gradient reaches the trained weights through
the quantised (student) forward only: the teacher's forward runs without gradients, unquantised."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_recipe
from test_speed import _window, camera_for, tiny_world

pytest.importorskip("torchao.prototype.mx_formats", reason="needs torchao: pip install 'biwm-quant[torchao]'")


def quantizer(name="nvfp4", **options):
    from biwm.core.plugins import get_plugin_manager

    return get_plugin_manager().get("quantizer", name).create(options)


def quantised(world, name="nvfp4"):
    q = quantizer(name)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp8 on the CPU: emulated, said with a warning
        q.convert(world.backbone.trainable(), training=True)
    return world, q


def batch(world):
    """One flow-matching batch for finetune_loss: chunk, history, camera, text, null text."""
    torch.manual_seed(3)
    c = world.backbone.latent_channels
    text = world.backbone.encode_text(["a room"])
    return (torch.randn(2, c, 2, 8, 8), torch.randn(2, c, 4, 8, 8), camera_for(6).select(torch.tensor([0, 0])),
            text.expand(2), world.backbone.encode_text([""]))


def loss_of(world, self_distill=None):
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss

    x0, history, camera, text, null = batch(world)
    return finetune_loss(world, FinetuneConfig(chunk_frames=2, max_history=4), x0, history, camera, text, null,
                         torch.Generator().manual_seed(0), self_distill=self_distill)


def test_channel_kl_is_the_reference_releases_softmax_kl_over_the_latent_channels():
    from biwm.core.selfdistill import channel_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 16, 3, 4, 4, requires_grad=True), torch.randn(2, 16, 3, 4, 4)
    # F.kl_div(log_softmax(s), softmax(t), "batchmean") over [positions, channels], as the release computes it
    reference = torch.nn.functional.kl_div(student.permute(0, 2, 3, 4, 1).reshape(-1, 16).log_softmax(-1),
                                           teacher.permute(0, 2, 3, 4, 1).reshape(-1, 16).softmax(-1),
                                           reduction="batchmean")
    kl = channel_kl(student, teacher)
    torch.testing.assert_close(kl, reference)
    assert kl > 0 and channel_kl(teacher, teacher) == 0
    kl.backward()
    assert student.grad.abs().sum() > 0


def test_weight_0_leaves_the_loss_unchanged_and_an_unquantised_model_gives_exactly_0():
    from biwm.core.selfdistill import SelfDistill

    world = tiny_world().train().requires_grad_(True)
    plain = loss_of(world)
    nothing = SelfDistill(0.0, quantizer().full_precision)
    assert torch.equal(loss_of(world, nothing), plain) and nothing.take() is None  # nothing ran
    unconverted = SelfDistill(0.03, quantizer().full_precision)
    assert torch.equal(loss_of(world, unconverted), plain)  # the teacher is the student
    assert unconverted.take() == 0


@pytest.mark.parametrize("name", ["nvfp4", "fp8"])
def test_a_quantised_student_gets_a_positive_term_whose_gradient_comes_through_the_student_only(name):
    from biwm.core.selfdistill import SelfDistill, channel_kl

    plain = tiny_world().train().requires_grad_(True)  # (trainable weights change the CPU kernels' last bits)
    world, q = quantised(copy.deepcopy(plain), name)
    window = _window(world)
    with torch.no_grad(), q.full_precision(world):  # the teacher: the same weights, unquantised
        assert torch.equal(world(window), plain(window))
    with torch.no_grad():
        assert not torch.equal(world(window), plain(window))

    layer = world.backbone.trainable().blocks[0].attn1.to_q
    seen = []  # (grad mode, output has a graph, forward class) per forward of the layer
    layer.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), out.requires_grad,
                                                                  m.forward.__qualname__)))
    sigma = torch.full((1,), 0.6)
    distill = SelfDistill(0.03, q.full_precision)
    term = distill(world, window, sigma)
    assert seen[0][:2] == (False, False) and seen[0][2] == "Linear.forward"  # teacher: no graph, unquantised
    assert seen[1][:2] == (True, True) and seen[1][2] != "Linear.forward"  # student: quantised, with a graph
    assert term > 0 and torch.equal(distill.take(), term.detach())
    term.backward()
    trained = [(n, p) for n, p in world.named_parameters() if p.requires_grad]
    grads = {n: p.grad for n, p in trained if p.grad is not None}
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())

    # the same gradient as the KL against the teacher's outputs given as constants: none flows through the teacher
    from biwm.core.schedule import predict_x0

    with torch.no_grad(), q.full_precision(world):
        teacher = world(window)
    world.zero_grad()
    student = world(window)
    x_t = window.chunk
    manual = 0.03 * (channel_kl(student, teacher) + 0.25 * channel_kl(predict_x0(x_t, student, sigma),
                                                                      predict_x0(x_t, teacher, sigma)))
    torch.testing.assert_close(manual, term.detach())
    manual.backward()
    for n, p in trained:
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-9)


def test_finetune_loss_adds_the_term_to_the_flow_matching_loss():
    from biwm.core.selfdistill import SelfDistill

    world, q = quantised(tiny_world().train().requires_grad_(True))
    plain = loss_of(world)
    distill = SelfDistill(0.03, q.full_precision)
    total = loss_of(world, distill)
    term = distill.take()
    assert term > 0
    torch.testing.assert_close(total.detach(), plain.detach() + term)


def test_distill_adds_the_term_to_each_generator_update():
    from biwm.core.dmd import DMD, student_sigmas
    from biwm.core.selfdistill import SelfDistill
    from biwm.core.stages.distill import DistillConfig, Distiller

    cfg = DistillConfig(batch_size=1, history_frames=2, chunks=2, chunk_frames=2, student_steps=2, ema=None)

    def nets(self_distill):
        def load(report):
            world, _ = quantised(tiny_world(compressor="none").requires_grad_(True))
            return world

        return Distiller(cfg, load, lambda backbone: [DMD()], torch.device("cpu"), self_distill=self_distill)

    q = quantizer()
    plain, distilled = nets(None), nets(SelfDistill(0.03, q.full_precision))
    world = plain.generator
    torch.manual_seed(5)
    clips = torch.randn(1, world.backbone.latent_channels, 6, 8, 8)
    camera = camera_for(6)
    text, null = world.backbone.encode_text(["a room"]), world.backbone.encode_text([""])
    sigmas = student_sigmas(cfg.student_steps, cfg.student_shift, torch.device("cpu"))
    out = {}
    for name, n in (("plain", plain), ("distilled", distilled)):
        out[name] = n.iteration(0, clips, camera, text, null, sigmas, torch.Generator().manual_seed(0), exit_step=1)
    term = distilled.self_distill.take()  # the mean over the 2 chunks
    assert term > 0
    # the DMD part draws the same numbers first: the generator losses differ by the term alone
    torch.testing.assert_close(out["distilled"][0], out["plain"][0] + term)


def test_recipes_validate_the_option_and_name_the_field_of_a_bad_value(tmp_path):
    from biwm.core.recipe import RecipeError, validate_recipe
    from biwm.core.selfdistill import SelfDistill

    data = tiny_recipe(tmp_path / "run")
    for name in ("nvfp4", "fp8"):
        data["model"]["quantize"] = {"name": name, "options": {"self_distill": 0.03}}
        term = SelfDistill.from_recipe(validate_recipe(data))
        assert term is not None and term.weight == 0.03
        data["model"]["quantize"] = {"name": name, "options": {"self_distill": -0.1}}
        with pytest.raises(RecipeError, match=r"model\.quantize\.options\.self_distill.*greater than or equal to 0"):
            validate_recipe(data)
        data["model"]["quantize"] = {"name": name}
        assert SelfDistill.from_recipe(validate_recipe(data)) is None  # default 0: off
    data["model"].pop("quantize")
    assert SelfDistill.from_recipe(validate_recipe(data)) is None


def test_a_recipe_with_self_distill_logs_the_term_in_finetune_and_distill(tmp_path):
    from test_distill import distill_recipe, run

    data = distill_recipe(tmp_path / "run", steps=2, chunks=1, generator_every=2)
    data["stages"][0]["steps"] = 2
    data["model"]["quantize"] = {"name": "nvfp4", "options": {"self_distill": 0.03}}
    stages = run(data)["stages"]
    finetune = stages["finetune"]
    assert finetune["finetune_self_distill_last"] > 0 and math.isfinite(finetune["finetune_loss_last"])
    assert stages["distill"]["generator_updates"] == 1 and stages["distill"]["distill_self_distill_last"] > 0
