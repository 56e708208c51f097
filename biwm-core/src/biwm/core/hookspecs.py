"""pluggy hook specifications: one registration callback per plugin kind.

A plugin module implements any of these with ``@biwm.core.hookimpl`` and calls ``register(name,
factory, options=..., description=...)`` for each thing it provides (the pattern of simonw/llm);
``register_stages`` takes ``register(name, config, runner, description=...)``. Core's own
controls, compressor ``none``, loss ``dmd`` and five stages are registered through the same hooks,
in :mod:`biwm.core.builtins`; the ``toyworld`` dataset is biwm-toyworld's (its entry point).
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
def register_datasets(register):
    """Register datasets: ``register(name, factory, options=Model, description=...)``.

    ``factory(options)`` returns a :class:`biwm.core.protocols.ClipSource` (optionally also an
    ``ActionSteps`` and an ``EvaluationScores``: its own scores in the evaluate stage). ``Model``
    is what a recipe's ``data:`` holds when ``data.source`` is NAME (validated by it, errors naming
    the field); give it a field ``source: Literal["NAME"] = "NAME"``, or it is added."""


@hookspec
def register_stages(register):
    """Register recipe stages: ``register(name, config, runner, description=...)``.

    ``config`` is the stage's pydantic model: a recipe's ``stages:`` item ``{stage: NAME, ...}`` is
    validated by it (errors name the field) and handed to the runner. Give it a field
    ``stage: Literal["NAME"] = "NAME"``, or it is added; a model that is not a
    :class:`biwm.core.config.Strict` one is range-checked like every plugin's options.
    ``runner(ctx, config, stage_dir) -> dict`` runs the stage (``ctx`` is the
    :class:`biwm.core.runner.RunContext`; the dict is the stage's metrics). It may be given as a
    ``"module:function"`` string, imported only when the stage runs, so listing or validating
    stages imports no runner."""


@hookspec
def register_commands(register):
    """Register CLI commands: ``register(name, command, description=...)`` adds ``biwm NAME``.
    ``command`` is a typer command function (its parameters become the command's arguments and
    options) or a ``typer.Typer`` (a group of subcommands). A name that a built-in command uses is
    refused with a warning."""
