"""Llama LoRA fine-tuning stages for MindSpore: data, model, checkpoint, training, launch.

A plain library: no Airflow import anywhere below this package. Each stage is a function with
typed arguments returning a small result object, and a CLI (`python -m llama_core.<stage>`; all of
them behind the `llama-lora` command).
"""

__version__ = "0.1.0"
