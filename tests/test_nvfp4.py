"""The nvfp4 quantizer (biwm-quant) and a recipe's ``model.quantize``.

CPU tests: the fake quantisation is torchao's quantise -> dequantise bit for bit, QAT gradients
reach the weights through the straight-through estimator, the training form and torchao's
weight-only inference form give the same outputs, a tiny recipe trains with it and its saved
model loads back quantised, and w4a4's NVFP4 GEMMs are refused or emulated, with the documented
message, where there are none. ``requires_gpu`` tests check the same on a CUDA GPU."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import requires_gpu, tiny_recipe
from test_speed import _window, tiny_world

pytest.importorskip("torchao.prototype.mx_formats", reason="needs torchao: pip install 'biwm-quant[torchao]'")


def quantizer(**options):
    from biwm.core.plugins import get_plugin_manager

    return get_plugin_manager().get("quantizer", "nvfp4").create(options)


def torchao_round(x: torch.Tensor) -> torch.Tensor:
    """torchao's NVFP4 quantise -> dequantise of a 2-D tensor, with its per-tensor scale."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())).dequantize(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_torchao_quantise_dequantise_exactly(dtype):
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
    from torchao.quantization import quantize_

    from biwm.quant.nvfp4 import NVFP4FakeQuantLinear, nvfp4_round

    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=dtype) * torch.logspace(-3, 1, 64, dtype=dtype)  # blocks of very different size
    x = torch.randn(2, 5, 64, dtype=dtype)
    assert torch.equal(nvfp4_round(w), torchao_round(w))
    assert torch.equal(nvfp4_round(x), torchao_round(x.reshape(10, 64)).view(2, 5, 64))  # leading dims flattened
    assert not torch.equal(nvfp4_round(w), w)
    assert torch.equal(nvfp4_round(nvfp4_round(w)), nvfp4_round(w))  # on the grid already
    assert torch.equal(nvfp4_round(torch.zeros(16, 16, dtype=dtype)), torch.zeros(16, 16, dtype=dtype))

    linear = torch.nn.Linear(64, 48, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    w4a16 = NVFP4FakeQuantLinear.from_linear(linear, activations=False)
    w4a4 = NVFP4FakeQuantLinear.from_linear(linear, activations=True)
    assert w4a16.weight is linear.weight and w4a16.bias is linear.bias
    assert torch.equal(w4a16(x), torch.nn.functional.linear(x, torchao_round(w), linear.bias))
    assert torch.equal(w4a4(x), torch.nn.functional.linear(nvfp4_round(x), torchao_round(w), linear.bias))
    # torchao's weight-only inference (packed 4-bit weights) gives the training form's outputs
    quantize_(linear, NVFP4WeightOnlyConfig())
    assert type(linear.weight).__name__ == "NVFP4Tensor"
    assert torch.equal(linear(x), w4a16(x))


def test_qat_gradients_reach_the_weights_through_the_straight_through_estimator():
    from biwm.quant.nvfp4 import NVFP4FakeQuantLinear, nvfp4_round

    torch.manual_seed(0)
    layer = NVFP4FakeQuantLinear.from_linear(torch.nn.Linear(32, 16), activations=True)
    x = torch.randn(3, 32, requires_grad=True)
    g = torch.randn(3, 16)
    layer(x).backward(g)
    # rounding passes gradients unchanged: those of F.linear(round(x), round(w))
    assert torch.equal(layer.weight.grad, g.t() @ nvfp4_round(x.detach()))
    assert torch.equal(layer.bias.grad, g.sum(0))
    assert torch.equal(x.grad, g @ nvfp4_round(layer.weight.detach()))

    world = tiny_world().train().requires_grad_(True)
    converted = quantizer().convert(world.backbone.trainable(), training=True)
    fake = [m for m in converted.modules() if isinstance(m, NVFP4FakeQuantLinear)]
    assert len(fake) == 20 and not any(m.activations for m in fake)  # 2 blocks x (4 + 4 + 2) linears, w4a16
    world(_window(world)).square().mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in fake)
    # the blocks only: the embeddings and the output projection stay plain linears
    assert type(converted.proj_out) is torch.nn.Linear


def test_which_linears_convert_default_blocks_from_any_container_or_named_prefixes():
    """By default the linears of the transformer's blocks, whether the quantizer is given the transformer or a
    module that holds it (the world model: converting it used to fall back to every linear, controls included,
    so a weight-bytes figure measured that way was not the evaluated model's); ``modules`` takes one prefix or
    several; a module without transformer blocks is an error that names the option."""
    from biwm.quant.nvfp4 import NVFP4FakeQuantLinear

    def converted(module, **options):
        quantizer(**options).convert(module, training=True)
        return sorted(name for name, m in module.named_modules() if isinstance(m, NVFP4FakeQuantLinear))

    on_transformer = converted(tiny_world().backbone.trainable())
    on_world = converted(tiny_world())
    assert len(on_transformer) == 20 and all(name.startswith("blocks.") for name in on_transformer)
    assert on_world == [f"backbone.transformer.{name}" for name in on_transformer]  # no control, no embedder
    several = converted(tiny_world().backbone.trainable(), modules=["blocks.0.", "condition_embedder.time_proj"])
    assert several == [n for n in on_transformer if n.startswith("blocks.0.")] + ["condition_embedder.time_proj"]
    with pytest.raises(ValueError, match=r"no repeated transformer blocks.*options\.modules"):
        quantizer().convert(torch.nn.Sequential(torch.nn.Linear(16, 16)), training=True)


def test_training_form_and_torchao_inference_form_give_the_same_outputs():
    original = tiny_world()
    window = _window(original)
    plain = original(window)
    for scheme in ("w4a16", "w4a4"):
        q = quantizer(scheme=scheme, emulate="always")
        world = copy.deepcopy(original)
        q.convert(world.backbone.trainable(), training=True)
        trained = world(window)
        err = ((trained - plain).norm() / plain.norm()).item()
        assert 1e-3 < err < 0.1, (scheme, err)
        q.convert(world.backbone.trainable(), training=False)  # from the training form to packed weights
        to_q = world.backbone.trainable().blocks[0].attn1.to_q
        assert type(to_q) is torch.nn.Linear and type(to_q.weight).__name__ == "NVFP4Tensor"
        assert torch.equal(world(window), trained), scheme


def test_w4a4_without_nvfp4_gemms_is_refused_or_emulated_with_the_documented_message():
    from pydantic import ValidationError

    world = tiny_world()
    module = world.backbone.trainable()
    for training in (True, False):
        with pytest.raises(RuntimeError, match=r"cpu has no NVFP4 GEMMs \(they need CUDA compute capability >= 10.0"):
            quantizer(scheme="w4a4", emulate="never").convert(module, training=training)
    with pytest.warns(UserWarning, match="no NVFP4 GEMMs on cpu .* emulating w4a4"):
        quantizer(scheme="w4a4").convert(module, training=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # w4a16 has no NVFP4 GEMM to miss anywhere: no warning
        quantizer().convert(tiny_world().backbone.trainable(), training=True)
    with pytest.raises(ValidationError, match="only scheme w4a4 has"):
        quantizer(emulate="never")
    with pytest.raises(ValueError, match="no linear layer under 'nothing.'"):
        quantizer(modules="nothing.").convert(module, training=True)


@requires_gpu
def test_gpu_nvfp4_paths_follow_the_compute_capability():
    """sm100+: w4a4 trains and infers with NVFP4 GEMMs close to the emulation; before sm100 it is
    refused (emulate: never) or emulated with the message; w4a16 inference runs on any CUDA GPU."""
    from biwm.quant.nvfp4 import nvfp4_gemm_available

    device = torch.device("cuda")
    world = tiny_world("cuda", dtype="bfloat16")
    window = _window(world, "cuda")
    emulated = tiny_world("cuda", dtype="bfloat16")
    quantizer(scheme="w4a4", emulate="always").convert(emulated.backbone.trainable(), training=False)
    reference = emulated(window)
    if nvfp4_gemm_available(device):
        quantizer(scheme="w4a4", emulate="never").convert(world.backbone.trainable(), training=False)
        out = world(window)
        assert ((out - reference).float().norm() / reference.float().norm()).item() < 0.02
    else:
        with pytest.raises(RuntimeError, match="has no NVFP4 GEMMs"):
            quantizer(scheme="w4a4", emulate="never").convert(world.backbone.trainable(), training=False)
        with pytest.warns(UserWarning, match="emulating w4a4"):
            quantizer(scheme="w4a4").convert(world.backbone.trainable(), training=False)
        assert torch.equal(world(window), reference)
    w4a16 = tiny_world("cuda", dtype="bfloat16")
    trained = tiny_world("cuda", dtype="bfloat16")
    quantizer().convert(w4a16.backbone.trainable(), training=False)
    quantizer().convert(trained.backbone.trainable(), training=True)
    assert torch.equal(w4a16(window), trained(window))


@pytest.mark.parametrize("backbone", ["wan", "hunyuan", "ltx"])
def test_a_recipe_with_model_quantize_nvfp4_trains_and_its_saved_model_loads_back_quantised(tmp_path, backbone):
    import shutil

    from rich.console import Console

    import biwm.core
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext, run_recipe
    from biwm.core.stages.common import load_world_model, read_card
    from biwm.quant.nvfp4 import NVFP4FakeQuantLinear

    data = tiny_recipe(tmp_path / "run", finetune={"steps": 2, "checkpoint_every": 2})
    data["stages"] = data["stages"][:1]
    data["model"]["backbone"]["name"] = backbone
    data["model"]["quantize"] = {"name": "nvfp4", "options": {"scheme": "w4a4", "emulate": "always"}}
    finetune = run_recipe(validate_recipe(data))["stages"]["finetune"]
    assert finetune["finetune_steps"] == 2 and math.isfinite(finetune["finetune_loss_last"])
    path = tmp_path / "alone" / "model.safetensors"  # away from its run: the card alone describes it
    path.parent.mkdir()
    shutil.copy(tmp_path / "run" / "finetune" / "model.safetensors", path)
    assert read_card(path)["model"]["quantize"] == {
        "name": "nvfp4", "options": {"scheme": "w4a4", "modules": None, "emulate": "always", "self_distill": 0.0}}

    world, _ = biwm.core.load(path)
    fake = [m for m in world.backbone.trainable().modules() if isinstance(m, NVFP4FakeQuantLinear)]
    assert fake and all(m.activations for m in fake)
    window = _window(world)
    with torch.no_grad():
        loaded = world(window)
        # the same weights in a plain model, converted for inference by torchao: the same outputs
        data["model"].pop("quantize")
        ctx = RunContext(recipe=validate_recipe(data), run_dir=tmp_path / "plain", console=Console(quiet=True))
        plain = load_world_model(ctx, init=path, report=False).eval()
        unquantised = plain(window)
        quantizer(scheme="w4a4", emulate="always").convert(plain.backbone.trainable(), training=False)
        assert torch.equal(plain(window), loaded)
        assert not torch.equal(unquantised, loaded)


def test_recipe_errors_name_the_quantizer_field(tmp_path):
    from biwm.core.recipe import RecipeError, validate_recipe

    data = tiny_recipe(tmp_path / "run")
    data["model"]["quantize"] = {"name": "nvfp4", "options": {"scheme": "w8a8"}}
    with pytest.raises(RecipeError, match=r"model\.quantize\.options\.scheme"):
        validate_recipe(data)
    data["model"]["quantize"] = {"name": "int3"}
    with pytest.raises(RecipeError, match=r"model\.quantize\.name.*unknown quantizer 'int3'; allowed: .*nvfp4"):
        validate_recipe(data)


def test_weight_bytes_counts_packed_nvfp4_weights_and_their_scales():
    """biwm.quant.weight_bytes: a plain bf16 model's bytes; after weight-only NVFP4, each weight's 4-bit values,
    e4m3 block scales (as torchao lays them out) and fp32 tensor scale, the biases unchanged in bf16."""
    from torch import nn

    from biwm.core.plugins import get_plugin_manager
    from biwm.quant import weight_bytes

    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64)).to(torch.bfloat16)
    values = 2 * 64 * 128
    assert weight_bytes(model) == (values + 128 + 64) * 2
    get_plugin_manager().get("quantizer", "nvfp4").create({"modules": ""}).convert(model, training=False)
    packed = sum(m.weight.qdata.nbytes + m.weight.scale.nbytes + m.weight.per_tensor_scale.nbytes for m in model)
    assert all(m.weight.qdata.dtype == torch.uint8 and m.weight.qdata.numel() * 2 == m.weight.shape.numel()
               for m in model)  # two 4-bit values per byte
    assert weight_bytes(model) == packed + (128 + 64) * 2
    assert (values + 128 + 64) * 2 / weight_bytes(model) > 3.2
