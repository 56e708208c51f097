"""pluggy hook specifications: one registration callback per plugin kind.

A plugin module implements any of these with ``@biwm.core.hookimpl`` and calls ``register(name,
factory, options=..., description=...)`` for each thing it provides (the pattern of simonw/llm).
"""

import pluggy

hookspec = pluggy.HookspecMarker("biwm")
hookimpl = pluggy.HookimplMarker("biwm")


@hookspec
def register_backbones(register):
    """Register Backbone factories."""


@hookspec
def register_controls(register):
    """Register ControlInjector factories."""


@hookspec
def register_compressors(register):
    """Register HistoryCompressor factories."""


@hookspec
def register_losses(register):
    """Register DistillLoss factories."""


@hookspec
def register_quantizers(register):
    """Register Quantizer factories."""


@hookspec
def register_commands(register):
    """Register CLI commands: ``register(name, command, description=...)`` adds ``biwm NAME``.
    ``command`` is a typer command function (its parameters become the command's arguments and
    options) or a ``typer.Typer`` (a group of subcommands). A name that a built-in command uses is
    refused with a warning."""
