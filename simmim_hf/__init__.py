"""SimMIM masked image modeling for HuggingFace transformers.

Importing the package registers `model_type="simmim"` with the Auto classes, so that
`AutoModelForMaskedImageModeling.from_pretrained(...)` etc. work for simmim checkpoints.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

# From its module: some transformers 5.x releases make the top-level name a placeholder that needs torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .configuration_simmim import PRESETS, SimMIMConfig
from .image_processing_simmim import SimMIMImageProcessor
from .modeling_simmim import (
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMModel,
    SimMIMPreTrainedModel,
    masked_l1_loss,
)

__version__ = "0.1.0.dev0"

AutoConfig.register("simmim", SimMIMConfig, exist_ok=True)
AutoModel.register(SimMIMConfig, SimMIMModel, exist_ok=True)
AutoModelForMaskedImageModeling.register(SimMIMConfig, SimMIMForMaskedImageModeling, exist_ok=True)
AutoModelForImageClassification.register(SimMIMConfig, SimMIMForImageClassification, exist_ok=True)
AutoImageProcessor.register(SimMIMConfig, image_processor_classes={"pil": SimMIMImageProcessor}, exist_ok=True)

# `save_pretrained` then copies the code and writes `auto_map`, so checkpoints load with
# `trust_remote_code=True` where simmim_hf is not installed.
SimMIMConfig.register_for_auto_class("AutoConfig")
SimMIMModel.register_for_auto_class("AutoModel")
SimMIMForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
SimMIMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
SimMIMImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PRESETS",
    "SimMIMConfig",
    "SimMIMForImageClassification",
    "SimMIMForMaskedImageModeling",
    "SimMIMImageProcessor",
    "SimMIMModel",
    "SimMIMPreTrainedModel",
    "masked_l1_loss",
]
