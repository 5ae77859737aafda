"""SimMIM masked image modeling for HuggingFace transformers."""

from .configuration_simmim import PRESETS, SimMIMConfig

__version__ = "0.1.0.dev0"
__all__ = ["PRESETS", "SimMIMConfig"]
