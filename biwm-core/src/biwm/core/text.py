"""Text conditioning: what a backbone's text encoders produce and its transformer consumes.

A :class:`TextConditioning` holds one or more named encoder outputs (Wan: one UMT5, ``"t5"``;
HunyuanVideo-1.5 has two encoders), each a :class:`TextEncoding`: embeddings [B, L, D] and a
boolean mask [B, L], True where a real token is. Callers handle it as a batch: move it, expand one
prompt to a batch, concatenate conditional and unconditional rows (classifier-free guidance), pick
or mix rows. How embeddings and masks reach the blocks is the backbone's business
(:meth:`biwm.core.protocols.Backbone.run_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, eq=False)
class TextEncoding:
    """One text encoder's output; checked where a :class:`TextConditioning` holds it."""

    embeds: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] bool, True = a real token (False: padding the backbone must ignore)


@dataclass(frozen=True, eq=False)
class TextConditioning:
    """The text conditioning of a batch: encoder name -> :class:`TextEncoding`, every encoder with
    one row per sample (lengths and widths may differ between encoders)."""

    encoders: Mapping[str, TextEncoding]

    def __post_init__(self) -> None:
        if not isinstance(self.encoders, Mapping) or not self.encoders:
            raise ValueError("TextConditioning needs at least one encoder (a mapping name -> TextEncoding)")
        batch: dict[str, int] = {}
        for name, enc in self.encoders.items():
            if not isinstance(enc, TextEncoding):
                raise TypeError(f"TextConditioning: encoder {name!r} must be a TextEncoding, got {type(enc).__name__}")
            embeds, mask = enc.embeds, enc.mask
            if embeds.dim() != 3 or not embeds.is_floating_point():
                raise ValueError(f"TextConditioning: embeds of {name!r} must be a float tensor [B, L, D], "
                                 f"got {embeds.dtype} {list(embeds.shape)}")
            if mask.dtype != torch.bool:
                raise ValueError(f"TextConditioning: mask of {name!r} must be bool (True = real token), "
                                 f"got {mask.dtype}")
            if mask.shape != embeds.shape[:2]:
                raise ValueError(f"TextConditioning: mask of {name!r} is {list(mask.shape)}, expected "
                                 f"{list(embeds.shape[:2])} (the [B, L] of its embeds)")
            if mask.device != embeds.device:
                raise ValueError(f"TextConditioning: mask of {name!r} is on {mask.device}, "
                                 f"its embeds on {embeds.device}")
            batch[name] = embeds.shape[0]
        if len(set(batch.values())) > 1:
            raise ValueError("TextConditioning: encoders disagree on the batch size: "
                             + ", ".join(f"{name!r} has {b}" for name, b in batch.items()))

    @classmethod
    def from_tensor(cls, embeds: Tensor, name: str, mask: Tensor | None = None) -> TextConditioning:
        """One encoder ``name`` with ``embeds`` [B, L, D]; ``mask`` None: every token real."""
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return cls({name: TextEncoding(embeds, mask)})

    def __getitem__(self, name: str) -> TextEncoding:
        if name not in self.encoders:
            raise KeyError(f"no text encoder {name!r} in this conditioning (it has {', '.join(map(repr, self.names))})")
        return self.encoders[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    @property
    def batch_size(self) -> int:
        return next(iter(self.encoders.values())).embeds.shape[0]

    def _map(self, fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> TextConditioning:
        return TextConditioning({name: TextEncoding(*fn(enc.embeds, enc.mask)) for name, enc in self.encoders.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> TextConditioning:
        """On ``device``, the embeddings in ``dtype`` (masks stay bool)."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"TextConditioning.to: dtype must be a float type (it applies to the embeds), got {dtype}")
        return self._map(lambda e, m: (e.to(device=device, dtype=dtype, non_blocking=non_blocking),
                                       m.to(device=device, non_blocking=non_blocking)))

    def expand(self, batch: int) -> TextConditioning:
        """A batch of ``batch`` rows: itself if it has that many, else its one row repeated (a view)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"TextConditioning.expand: a batch of {self.batch_size} cannot be expanded to {batch} "
                             "(only a batch of 1 expands)")
        return self._map(lambda e, m: (e.expand(batch, -1, -1), m.expand(batch, -1)))

    def select(self, rows: int | slice | Sequence[int] | Tensor) -> TextConditioning:
        """Rows along the batch: an int keeps the batch dimension (size 1), a slice, indices or a bool mask."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        elif not isinstance(rows, (slice, Tensor)):
            rows = torch.as_tensor(list(rows), dtype=torch.long)
        return self._map(lambda e, m: (e[rows], m[rows]))

    @classmethod
    def cat(cls, items: Sequence[TextConditioning]) -> TextConditioning:
        """Rows of ``items`` one after the other (e.g. conditional then unconditional). Each encoder is
        padded to its longest length among them: zero embeddings, mask False."""
        items = list(items)
        if not items:
            raise ValueError("TextConditioning.cat needs at least one conditioning")
        names = _same_encoders(items, "cat")
        out = {}
        for name in names:
            embeds, masks = _padded([item[name] for item in items], name, "cat")
            out[name] = TextEncoding(torch.cat(embeds), torch.cat(masks))
        return cls(out)

    @classmethod
    def where(cls, condition: Tensor, a: TextConditioning, b: TextConditioning) -> TextConditioning:
        """Per row, ``a``'s where ``condition`` [B] (bool) holds, else ``b``'s (e.g. prompts dropped for
        classifier-free guidance training); a batch of 1 is expanded to B, lengths padded as in :meth:`cat`."""
        if condition.dim() != 1 or condition.dtype != torch.bool:
            raise ValueError(f"TextConditioning.where: condition must be a bool tensor [B], "
                             f"got {condition.dtype} {list(condition.shape)}")
        batch = condition.shape[0]
        a, b = a.expand(batch), b.expand(batch)
        out = {}
        for name in _same_encoders([a, b], "where"):
            (ea, eb), (ma, mb) = _padded([a[name], b[name]], name, "where")
            out[name] = TextEncoding(torch.where(condition.view(-1, 1, 1), ea, eb),
                                     torch.where(condition.view(-1, 1), ma, mb))
        return cls(out)


def _same_encoders(items: Sequence[TextConditioning], op: str) -> tuple[str, ...]:
    names = items[0].names
    for item in items[1:]:
        if set(item.names) != set(names):
            raise ValueError(f"TextConditioning.{op}: the encoders differ ({', '.join(map(repr, names))} and "
                             f"{', '.join(map(repr, item.names))})")
    return names


def _padded(encodings: list[TextEncoding], name: str, op: str) -> tuple[list[Tensor], list[Tensor]]:
    """Embeds and masks of one encoder, padded to the longest length (zeros, mask False)."""
    widths = {e.embeds.shape[2] for e in encodings}
    if len(widths) > 1:
        raise ValueError(f"TextConditioning.{op}: embeds of {name!r} have different widths {sorted(widths)}")
    length = max(e.embeds.shape[1] for e in encodings)
    embeds = [F.pad(e.embeds, (0, 0, 0, length - e.embeds.shape[1])) if e.embeds.shape[1] < length else e.embeds
              for e in encodings]
    masks = [F.pad(e.mask, (0, length - e.mask.shape[1]), value=False) if e.mask.shape[1] < length else e.mask
             for e in encodings]
    return embeds, masks
