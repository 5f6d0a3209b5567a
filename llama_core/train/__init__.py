"""Training: MindRecord data, AdamW + cosine schedule, data-parallel trainer, checkpoints, predict.

Importing this package loads nothing: `outputs` (the run's output layout) is read by the Airflow
operator and the checkpoint tools, which must not pull in MindSpore; the trainer is
`llama_core.train.trainer.train`.
"""
