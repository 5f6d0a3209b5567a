"""Training: MindRecord data, AdamW + cosine schedule, data-parallel trainer, checkpoints, predict."""

from llama_core.train.trainer import TrainResult, finetune, train

__all__ = ["TrainResult", "finetune", "train"]
