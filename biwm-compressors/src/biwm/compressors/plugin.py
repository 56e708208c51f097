"""Entry point of biwm-compressors. Nothing is registered yet; implementations land with their issues."""

from biwm.core import hookimpl


@hookimpl
def register_compressors(register):
    """Registers nothing yet."""
