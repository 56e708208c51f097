"""The stages a recipe can run. Config models are light; runners import lazily."""

from biwm.core.stages.distill import DistillConfig
from biwm.core.stages.evaluate import EvaluateConfig
from biwm.core.stages.export import ExportConfig
from biwm.core.stages.finetune import FinetuneConfig
from biwm.core.stages.generate import GenerateConfig

STAGE_CONFIGS = {"finetune": FinetuneConfig, "distill": DistillConfig, "generate": GenerateConfig,
                 "evaluate": EvaluateConfig, "export": ExportConfig}
STAGE_RUNNERS = {
    "finetune": "biwm.core.stages.finetune:run",
    "distill": "biwm.core.stages.distill:run",
    "generate": "biwm.core.stages.generate:run",
    "evaluate": "biwm.core.stages.evaluate:run",
    "export": "biwm.core.stages.export:run",
}
