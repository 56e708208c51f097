"""FP8 training in the ``fp8`` quantizer (biwm-quant): torchao's float8 training linears on the
transformer's block linears, emulated on the CPU with the documented warning, close to the
unquantised model, trainable, and with the plain model's parameter names and dtypes (so its
checkpoints load into a plain model); refused where FP8 GEMMs are asked for and missing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import requires_gpu
from test_speed import _window, tiny_world

pytest.importorskip("torchao.float8", reason="needs torchao: pip install 'biwm-quant[torchao]'")

EMULATED = r"no FP8 GEMMs on cpu; training with torchao's {} float8 linears in emulation"


def quantizer(**options):
    from biwm.core.plugins import get_plugin_manager

    return get_plugin_manager().get("quantizer", "fp8").create(options)


def float8_linears(module) -> dict:
    from torchao.float8.float8_linear import Float8Linear

    return {name: m for name, m in module.named_modules() if isinstance(m, Float8Linear)}


@pytest.mark.parametrize(("granularity", "recipe"), [("row", "rowwise"), ("tensor", "tensorwise")])
def test_training_converts_the_block_linears_to_float8_and_stays_close_to_the_plain_model(granularity, recipe):
    from torchao.float8.config import ScalingGranularity

    plain = tiny_world()
    world = copy.deepcopy(plain)
    module = world.backbone.trainable()
    before = {name: (p, p.dtype) for name, p in module.named_parameters()}
    with pytest.warns(UserWarning, match=EMULATED.format(recipe)):
        converted = quantizer(granularity=granularity).convert(module, training=True)
    assert converted is module
    fp8 = float8_linears(module)
    # the same targets as inference: 2 blocks x (4 self-attention + 4 cross-attention + 2 feed-forward) linears
    assert len(fp8) == 20 and all(name.startswith("blocks.") for name in fp8)
    assert all(m.config.emulate for m in fp8.values())  # no FP8 GEMM on the CPU
    expected = ScalingGranularity.AXISWISE if granularity == "row" else ScalingGranularity.TENSORWISE
    assert all(m.config.cast_config_weight.scaling_granularity is expected for m in fp8.values())
    # everything else untouched: the embeddings and the output projection stay plain linears
    assert type(module.proj_out) is torch.nn.Linear
    assert not float8_linears(world.controls) and not float8_linears(world.compressor)
    # the parameters are the same objects, names and dtypes
    after = dict(module.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is p and after[name].dtype == dtype for name, (p, dtype) in before.items())

    window = _window(world)
    with torch.no_grad():
        reference, out = plain(window), world(window)
    err = ((out - reference).norm() / reference.norm()).item()
    # measured on the tiny model: relative error rowwise 0.0044, tensorwise 0.0047 (e4m3: 3 mantissa bits)
    assert 1e-4 < err < 0.02, err


def test_gradients_reach_the_float8_weights_and_sgd_lowers_a_regression_loss():
    world = tiny_world().train().requires_grad_(True)
    with pytest.warns(UserWarning, match=EMULATED.format("rowwise")):
        quantizer().convert(world.backbone.trainable(), training=True)
    world(_window(world)).square().mean().backward()
    grads = [m.weight.grad for m in float8_linears(world).values()]
    assert len(grads) == 20 and all(g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0
                                    for g in grads)

    # a toy regression: a two-layer MLP (every linear converted) learns a fixed random linear map
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    with pytest.warns(UserWarning, match=EMULATED.format("rowwise")):
        quantizer(modules="").convert(model, training=True)
    assert len(float8_linears(model)) == 2
    x = torch.randn(256, 32)
    y = x @ torch.randn(32, 16) / 32**0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses  # measured: 1.12 -> 0.20


def test_a_float8_trained_model_saves_the_plain_models_state_dict():
    plain = tiny_world()
    world = tiny_world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer().convert(world.backbone.trainable(), training=True)
    state = world.state_dict()
    assert list(state) == list(plain.state_dict())
    assert all(state[k].dtype == v.dtype and type(state[k]) is torch.Tensor for k, v in plain.state_dict().items())
    other = tiny_world("cpu", layers=2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(state, strict=True)  # a plain model takes the checkpoint as it is
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values()))


def test_the_training_form_converts_on_for_inference():
    world = tiny_world()
    module = world.backbone.trainable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer().convert(module, training=True)
        quantizer().convert(module, training=False)  # e.g. a rollout's SpeedOptions(quantize=fp8) after training
    assert not float8_linears(module)
    to_q = module.blocks[0].attn1.to_q
    assert type(to_q) is torch.nn.Linear and to_q._forward_pre_hooks  # emulated inference: inputs rounded


def test_fp8_gemms_asked_for_on_the_cpu_are_refused_naming_the_capability():
    module = tiny_world().backbone.trainable()
    for training in (True, False):
        with pytest.raises(RuntimeError, match=r"quantizer fp8: cpu has no FP8 GEMMs \(they need CUDA compute "
                                               r"capability >= 8.9, Ada or Hopper\)"):
            quantizer(emulate="never").convert(module, training=training)
    assert not float8_linears(module)
    with pytest.warns(UserWarning, match=EMULATED.format("tensorwise")):
        quantizer(emulate="always", granularity="tensor").convert(module, training=True)
    assert all(m.config.emulate for m in float8_linears(module).values())
    assert "compute capability >= 8.9" in quantizer().requirements() and "float8 training" in quantizer().requirements()


def test_a_recipe_with_model_quantize_fp8_trains_and_its_weights_load_into_a_plain_model(tmp_path):
    import math

    from rich.console import Console

    from biwm.core.checkpoint import load_model_tensors
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext, run_recipe
    from biwm.core.stages.common import load_world_model
    from conftest import tiny_recipe

    data = tiny_recipe(tmp_path / "run", finetune={"steps": 2, "checkpoint_every": 2})
    data["stages"] = data["stages"][:1]
    data["model"]["quantize"] = {"name": "fp8", "options": {"granularity": "tensor"}}
    with pytest.warns(UserWarning, match=EMULATED.format("tensorwise")):
        finetune = run_recipe(validate_recipe(data))["stages"]["finetune"]
    assert finetune["finetune_steps"] == 2 and math.isfinite(finetune["finetune_loss_last"])
    path = tmp_path / "run" / "finetune" / "model.safetensors"
    data["model"].pop("quantize")
    ctx = RunContext(recipe=validate_recipe(data), run_dir=tmp_path / "plain", console=Console(quiet=True))
    plain = load_world_model(ctx, init=path, report=False)  # strict: every name and shape matches
    assert not float8_linears(plain)
    saved = load_model_tensors(path)
    state = {f"{name}.{k}": v for name, m in plain.trainable_modules().items() for k, v in m.state_dict().items()}
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


@requires_gpu
def test_gpu_float8_training_uses_fp8_gemms_from_compute_capability_8_9():
    from biwm.quant.fp8 import fp8_gemm_available

    world = tiny_world("cuda", dtype="bfloat16").train().requires_grad_(True)
    module = world.backbone.trainable()
    if fp8_gemm_available(torch.device("cuda")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the real path: no warning
            quantizer(emulate="never").convert(module, training=True)
        assert not any(m.config.emulate for m in float8_linears(module).values())
    else:
        with pytest.raises(RuntimeError, match=r"cuda(:\d)? \(compute capability \d\.\d\) has no FP8 GEMMs"):
            quantizer(emulate="never").convert(module, training=True)
        with pytest.warns(UserWarning, match="training with torchao's rowwise float8 linears in emulation"):
            quantizer().convert(module, training=True)
    world(_window(world, "cuda")).float().square().mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in float8_linears(module).values())
