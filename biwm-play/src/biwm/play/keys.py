"""Held keys -> the action of a chunk's frames. The page sends the key letters of
:func:`biwm.core.camera.parse_keys` (w/s a/d move, i/k j/l turn; it maps the arrow keys to i/k/j/l);
opposite keys held together cancel, no key is idle."""

from __future__ import annotations

from biwm.core.camera import parse_keys

KEYS = frozenset("wasdijkl")
_OPPOSITE = {"w": "s", "s": "w", "a": "d", "d": "a", "i": "k", "k": "i", "j": "l", "l": "j"}


def action_for(held: set[str] | frozenset[str] | list[str]) -> int:
    """The action label of a set of held key letters (a ValueError names an unknown key)."""
    unknown = sorted(set(held) - KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {''.join(sorted(KEYS))}")
    net = [key for key in sorted(held) if _OPPOSITE[key] not in held]
    return int(parse_keys("".join(net) or "_")[0])
