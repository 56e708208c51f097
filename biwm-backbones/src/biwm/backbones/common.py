"""What every diffusers backbone adapter shares: checks of a local diffusers-format weights folder
(run when a recipe is validated), model dtypes, pinning diffusers' attention to one SDPA kernel, the
per-window attention mask on a diffusers processor, text encoders cached per prompt and loaded once,
a VAE codec streamed by re-decoding context, the options and backbone methods around the transformer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from biwm.core.checkpoint import read_json_object
from biwm.core.config import InputDir
from biwm.core.schedule import timestep as schedule_timestep
from biwm.core.text import TextConditioning, TextEncoding

from biwm.backbones.codecs import PixelCodec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# diffusers' attention-dispatch names of PyTorch's SDPA kernels (SpeedOptions.attention)
ATTENTION_KERNELS = {"auto": "native", "flash": "_native_flash", "cudnn": "_native_cudnn",
                     "efficient": "_native_efficient", "math": "_native_math"}

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


class BackboneConfigError(ValueError):
    """A backbone's weights folder or options that cannot work (raised while a recipe is validated)."""


def transformer_dir(weights: Path, family: str) -> Path:
    """The transformer folder of a diffusers-format directory: ``transformer/``, or the directory itself."""
    if not weights.is_dir():
        raise BackboneConfigError(f"directory not found: {weights} "
                                  f"(expected a diffusers-format {family} directory with transformer/config.json)")
    for candidate in (weights / "transformer", weights):
        if (candidate / "config.json").is_file():
            return candidate
    raise BackboneConfigError(f"{weights} has no transformer/config.json or "
                              f"config.json (expected a diffusers-format {family} directory)")


def weights_file_problem(folder: Path) -> str | None:
    """Why a diffusers model folder cannot load (no safetensors weights, single or sharded), or None."""
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return None
    others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
    return (f"{folder} has config.json but no weights file ({' or '.join(WEIGHT_FILES)})"
            + (f"; found {', '.join(others)}, but only safetensors weights are loaded" if others else ""))


def check_shape(config: dict[str, Any], expected: dict[str, Any], keys: tuple[str, ...], preset: str,
                where: Path) -> None:
    """A folder's transformer config against the preset's, on the ``keys`` that set the weights' shapes
    (lists and tuples compare equal: JSON has no tuples)."""
    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    wrong = [f"{k} is {config.get(k)}, expected {expected[k]}" for k in keys
             if k in expected and norm(config.get(k)) != norm(expected[k])]
    if wrong:
        raise BackboneConfigError(f"{where} does not match preset {preset!r}: " + "; ".join(wrong))


def missing_parts(root: Path | None, parts: dict[str, str], model_folders: tuple[str, ...] = ("vae",)) -> list[str]:
    """The sub-folders of ``parts`` that ``root`` lacks (all of them without a root): a model folder
    (``model_folders``) needs its config.json, any other part (text encoders, tokenizers) a non-empty folder."""
    if root is None:
        return list(parts)
    return [part for part in parts if not ((root / part / "config.json").is_file() if part in model_folders
                                           else (root / part).is_dir() and any((root / part).iterdir()))]


def check_weights_folder(weights: Path, family: str, preset: str, expected: dict[str, Any], shape_keys: tuple[str, ...],
                         missing: list[str], part_names: dict[str, str], random_init: bool,
                         model_folders: tuple[str, ...]) -> None:
    """Everything wrong with a weights folder for ``preset``, in one BackboneConfigError: a transformer of
    another shape or without safetensors weights, parts missing (unless ``random_init``), a model folder
    (the VAE) without weights."""
    tdir = transformer_dir(weights, family)
    config = read_json_object(tdir / "config.json", "a diffusers model config")
    check_shape(config, expected, shape_keys, preset, tdir)
    problems = [p for p in [weights_file_problem(tdir)] if p]
    if missing and not random_init:
        problems.append(
            f"{weights} has no {', '.join(f'{m}/' for m in missing)}: preset {preset!r} would run "
            f"with a random {' and a random '.join(part_names[m] for m in missing)}; add "
            f"{'them' if len(missing) > 1 else 'it'} from the release, or set random_init: true for "
            "speed/memory runs")
    problems += [p for folder in model_folders if folder not in missing
                 for p in [weights_file_problem(weights / folder)] if p]
    if problems:
        raise BackboneConfigError("; ".join(problems))


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``dtype`` everywhere except the modules diffusers keeps in float32 (norms, time embedding,
    modulation table), as ``from_pretrained(torch_dtype=dtype)`` loads a released checkpoint."""
    nn.Module.to(model, dtype)  # ModelMixin.to would warn about exactly the modules restored below
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype != torch.float32:
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.float()
    return model


def set_attention_kernel(transformer: nn.Module, name: str) -> None:
    """Make every attention call of a diffusers ``transformer`` use one of PyTorch's SDPA kernels
    (``ATTENTION_KERNELS``; "auto": PyTorch's choice), through diffusers' attention dispatcher."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {name!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)  # it warns that the dispatcher is experimental on every call
    try:
        transformer.set_attention_backend(ATTENTION_KERNELS[name])
    finally:
        diffusers_logging.set_verbosity(level)


class MaskableProcessor:
    """A diffusers attention processor (``inner``) plus an attention mask set per window (diffusers'
    blocks pass none, or only their text mask); subclasses say how the mask reaches ``inner``."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.mask: Tensor | None = None

    # diffusers' set_attention_backend and parallel config set these on the processor: pass them through
    _attention_backend = property(lambda self: self.inner._attention_backend,
                                  lambda self, value: setattr(self.inner, "_attention_backend", value))
    _parallel_config = property(lambda self: self.inner._parallel_config,
                                lambda self, value: setattr(self.inner, "_parallel_config", value))


def channels_last_conv3d(module: nn.Module) -> None:
    """Every Conv3d weight under ``module`` in channels-last (NDHWC) layout: cuDNN's bf16 kernels then
    produce channels-last activations instead of transposing before and after each convolution."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)


class CachedTextEncoders(nn.Module):
    """Named text encoders (the attributes ``NAMES``, each a callable prompts -> TextEncoding) whose
    encodings are cached per prompt (the last ``cache_size``), trimmed to the prompt's real tokens (padding
    is masked, so only its length changes: the text stream's)."""

    NAMES: ClassVar[tuple[str, ...]]

    def __init__(self, cache_size: int = 64):
        super().__init__()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, TextConditioning] = OrderedDict()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextConditioning:
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            encoded = {name: getattr(self, name)(new) for name in self.NAMES}
            for row, prompt in enumerate(new):
                self._cache[prompt] = TextConditioning({name: _trimmed(enc, row) for name, enc in encoded.items()})
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        device = next(chain(self.parameters(), self.buffers())).device  # cached rows follow the encoders' moves
        out = TextConditioning.cat([self._cache[p].to(device) for p in prompts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out.to(dtype=torch.float32)


def _trimmed(enc: TextEncoding, row: int) -> TextEncoding:
    """Row ``row`` of ``enc`` up to its last real token (one masked token if it has none)."""
    mask = enc.mask[row]
    length = int(mask.nonzero().max()) + 1 if mask.any() else 1
    return TextEncoding(enc.embeds[row : row + 1, :length], mask[None, :length])


_LOADED_TEXT_ENCODERS: dict[tuple[str, str, str], nn.Module] = {}


def load_text_encoders_once(family: str, weights: Path, dtype: torch.dtype,
                            load: Callable[[Path, torch.dtype], nn.Module]) -> nn.Module:
    """``load(weights, dtype)``, once per process and weights folder (a distill stage builds three backbones)."""
    key = (family, str(weights.resolve()), str(dtype))
    if key not in _LOADED_TEXT_ENCODERS:
        _LOADED_TEXT_ENCODERS[key] = load(weights, dtype)
    return _LOADED_TEXT_ENCODERS[key]


class ContextVAECodec(nn.Module):
    """A frozen diffusers video VAE whose decoder keeps no state between calls (subclasses: ``encode`` and
    ``decode`` with the pipeline's latent scaling). Streaming decode re-decodes the last ``decode_context``
    latent frames before each chunk."""

    def __init__(self, vae: nn.Module, spatial_factor: int, temporal_factor: int, latent_channels: int,
                 decode_context: int = 16):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = latent_channels
        self.decode_context = decode_context

    def stream_decoder(self) -> ContextStreamDecoder:
        return ContextStreamDecoder(self)

    def channels_last_decoder(self) -> None:
        """The decoder's Conv3d weights in channels-last (NDHWC) layout."""
        channels_last_conv3d(self.vae.decoder)

    def compile_decoder(self, **kwargs: Any) -> None:
        self.vae.decoder.compile(**kwargs)


class ContextStreamDecoder:
    """Decodes a rollout chunk by chunk with a :class:`ContextVAECodec`: each chunk is decoded after the last
    ``decode_context`` latent frames before it and only its own frames are kept. Equal to decoding the whole
    video so far while the rollout is no longer than that (for a causal decoder, to decoding the whole
    video), a bounded approximation after."""

    def __init__(self, codec: ContextVAECodec):
        self.codec = codec
        self.context: Tensor | None = None

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        window = latents if self.context is None else torch.cat([self.context, latents.to(self.context)], dim=2)
        frames = self.codec.decode(window)
        if self.context is not None:
            frames = frames[:, :, -latents.shape[2] * self.codec.temporal_factor:]
        self.context = window[:, :, -self.codec.decode_context:]
        return frames


class DiffusersBackbone(nn.Module):
    """What the adapters share around their transformer: the codec (a VAE codec or the tiny presets'
    pixel codec), the speed capabilities, the 1000-sigma timestep convention."""

    random_parts: list[str] = []  # parts of a real preset built with random weights (random_init: true)

    def __init__(self, transformer: nn.Module, codec: nn.Module, text_encoder: nn.Module, preset: str):
        super().__init__()
        self.transformer = transformer
        self.codec = codec
        self.text_encoder = text_encoder
        self.preset = preset
        cfg = transformer.config
        self.hidden_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.temporal_factor = codec.temporal_factor
        self.spatial_factor = codec.spatial_factor

    def install_processors(self, attentions: list[nn.Module], processor: Callable[[], MaskableProcessor]) -> None:
        """A fresh ``processor()`` on each of ``attentions`` (the blocks' self-attention): what
        :meth:`window_mask` sets the window's mask on."""
        self._processors = [processor() for _ in attentions]
        for attn, proc in zip(attentions, self._processors):
            attn.set_processor(proc)

    @contextmanager
    def window_mask(self, mask: Tensor | None) -> Iterator[None]:
        """The window's attention mask (None: bidirectional) on every installed processor, for one forward."""
        for proc in self._processors:
            proc.mask = mask
        try:
            yield
        finally:
            for proc in self._processors:
                proc.mask = None

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, under gradient checkpointing when the transformer has it on and gradients are on."""
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
            return self.transformer._gradient_checkpointing_func(block, *args)
        return block(*args)

    def trainable(self) -> nn.Module:
        return self.transformer

    def encode_video(self, frames: Tensor) -> Tensor:
        return self.codec.encode(frames)

    def decode_video(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents)

    def stream_decoder(self):
        return self.codec.stream_decoder()

    def set_attention_kernel(self, name: str) -> None:
        """Make every attention call use one of PyTorch's SDPA kernels (``ATTENTION_KERNELS``; "auto":
        PyTorch's choice), through diffusers' attention dispatcher."""
        set_attention_kernel(self.transformer, name)

    def compile_decoder(self, **kwargs: Any) -> None:
        """torch.compile the VAE decoder (the pixel codec of tiny presets has nothing to compile)."""
        if hasattr(self.codec, "compile_decoder"):
            self.codec.compile_decoder(**kwargs)

    def channels_last_decoder(self) -> None:
        """Channels-last convolutions in the VAE decoder (nothing to do for the pixel codec)."""
        if hasattr(self.codec, "channels_last_decoder"):
            self.codec.channels_last_decoder()

    def timestep(self, sigma: Tensor) -> Tensor:
        return schedule_timestep(sigma)  # 1000 sigma: Wan's and HunyuanVideo-1.5's flow-matching convention


class BackboneOptions(BaseModel):
    """Options every diffusers backbone shares; a family's subclass sets ``preset`` (a Literal of its
    ``PRESETS``: each {"transformer": config, "codec": {"kind": "pixel" | "vae", ...}}) and the class
    variables below."""

    model_config = ConfigDict(extra="forbid")

    FAMILY: ClassVar[str]
    PRESETS: ClassVar[dict[str, dict[str, Any]]]
    SHAPE_KEYS: ClassVar[tuple[str, ...]]  # transformer config keys that set the weights' shapes
    PART_NAMES: ClassVar[dict[str, str]]  # sub-folders a VAE preset needs beside the transformer -> what they are

    preset: str
    weights: InputDir | None = None
    random_init: bool = Field(False, description="real-size preset with random weights (speed/memory benchmarks)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="transformer config overrides (pixel-codec presets only)")

    @property
    def pixel_codec(self) -> bool:
        return self.PRESETS[self.preset]["codec"]["kind"] == "pixel"

    def transformer_config(self) -> dict[str, Any]:
        return {**self.PRESETS[self.preset]["transformer"], **self.overrides}

    @model_validator(mode="after")
    def _check_weights(self) -> "BackboneOptions":
        """Catch a wrong or mismatched weights folder when the recipe is validated, not mid-run."""
        if self.overrides and not self.pixel_codec:
            pixel = [name for name, p in self.PRESETS.items() if p["codec"]["kind"] == "pixel"]
            raise ValueError(f"overrides: only the pixel-codec presets ({', '.join(pixel)}) may change their shape")
        if self.weights is not None:
            check_weights_folder(Path(self.weights), self.FAMILY, self.preset, self.transformer_config(),
                                 self.SHAPE_KEYS, self.missing_parts(), self.PART_NAMES, self.random_init,
                                 () if self.pixel_codec else ("vae",))
        elif not self.pixel_codec and not self.random_init:
            raise ValueError(f"weights: preset {self.preset!r} needs a local diffusers-format directory "
                             "(or random_init: true for speed/memory runs)")
        return self

    def build_transformer(self, model_class: type) -> nn.Module:
        """The preset's diffusers transformer (``model_class``), loaded from ``weights`` or built at the preset's
        config with random weights, in ``dtype``; gradient checkpointing on when asked."""
        dtype = DTYPES[self.dtype]
        if self.weights is not None:
            transformer = model_class.from_pretrained(transformer_dir(Path(self.weights), self.FAMILY),
                                                      torch_dtype=dtype)
        else:
            transformer = cast_like_from_pretrained(model_class(**self.transformer_config()), dtype)
        if self.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer

    def build_codec(self, codec_class: type, vae_class: type, **codec_options: Any) -> nn.Module:
        """The preset's codec: the pixel codec, or ``codec_class(vae, **codec_options)`` around its VAE
        (``vae_class``) from ``weights``' vae/, or built at the preset's config with random weights."""
        codec = self.PRESETS[self.preset]["codec"]
        if codec["kind"] == "pixel":
            return PixelCodec(codec["spatial_factor"])
        dtype = DTYPES[self.dtype]
        if "vae" in self.missing_parts():
            vae = vae_class(**codec["vae"]).to(dtype)
        else:
            vae = vae_class.from_pretrained(Path(self.weights) / "vae", torch_dtype=dtype)
        return codec_class(vae, **codec_options)

    def random_parts(self) -> list[str]:
        """What a VAE preset runs with random weights (the runner prints it): the transformer without
        ``weights``, the parts ``weights`` lacks (tokenizers have no weights)."""
        if self.pixel_codec:
            return []
        return (["transformer"] if self.weights is None else []) + [
            self.PART_NAMES[p] for p in self.missing_parts() if not p.startswith("tokenizer")]

    def missing_parts(self) -> list[str]:
        """Sub-folders of ``PART_NAMES`` a VAE preset needs beside the transformer that ``weights`` lacks (all
        of them without ``weights``); none for a pixel-codec preset."""
        if self.pixel_codec:
            return []
        return missing_parts(None if self.weights is None else Path(self.weights), self.PART_NAMES)


def attach_block_method(blocks, name: str, fn) -> None:
    """``fn(block, ...)`` as each of diffusers' ``blocks``' own method ``name``: code that reads a block's
    weights outside its ``forward`` runs through it, so FSDP2, which shards each block as a unit, gathers
    the weights around it (:func:`biwm.core.sharded.register_window_forwards`)."""
    import types

    for block in blocks:
        setattr(block, name, types.MethodType(fn, block))
