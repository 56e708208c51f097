"""Entry point of biwm-losses. Nothing is registered yet; implementations land with their issues."""

from biwm.core import hookimpl


@hookimpl
def register_losses(register):
    """Registers nothing yet."""
