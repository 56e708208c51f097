"""Entry point of biwm-quant. Nothing is registered yet; implementations land with their issues."""

from biwm.core import hookimpl


@hookimpl
def register_quantizers(register):
    """Registers nothing yet."""
