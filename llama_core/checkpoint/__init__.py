"""Llama checkpoints: MindSpore .ckpt streaming I/O, HF <-> MindSpore conversion, sharding, LoRA tools.

Nothing here imports MindSpore or torch: the formats are read and written directly, one tensor
at a time, so tools run in small memory whatever the model size.
"""
