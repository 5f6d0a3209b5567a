"""The "will it fit" table of docs/operations.md: the memory plan (`llama_core.plan`) of each shipped
Llama config on an Ascend 910B at seq 4096, for every model_parallel a node holds, with and without
recompute. Each config keeps its own batch size, dtypes and max_device_memory.

`python scripts/plan_table.py` prints the Markdown table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_core.config import apply_overrides, load_config
from llama_core.model.config import LlamaConfig
from llama_core.plan import GIB, MODEL_PARALLEL_CHOICES, indivisible, memory_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEQ = 4096
# Llama 3.1 70B has no config here: the 8B one at the sizes of meta-llama/Llama-3.1-70B's config.json,
# bf16 weights as configs/lora_llama2_70b.yaml (fp32 ones would need 35 GB per NPU at model_parallel 8)
LLAMA3_1_70B = {
    "model.model_config.hidden_size": 8192,
    "model.model_config.num_layers": 80,
    "model.model_config.num_heads": 64,
    "model.model_config.intermediate_size": 28672,
    "model.model_config.param_init_type": "bfloat16",
}
MODELS = {
    "Llama 2 7B": ("lora_llama2_7b.yaml", {}),
    "Llama 2 13B": ("lora_llama2_13b.yaml", {}),
    "Llama 2 70B": ("lora_llama2_70b.yaml", {}),
    "Llama 3.1 8B": ("lora_llama3_1_8b.yaml", {}),
    "Llama 3.1 70B": ("lora_llama3_1_8b.yaml", LLAMA3_1_70B),
}


def cell(cfg: dict[str, Any]) -> str:
    plan = memory_plan(cfg, "Ascend")
    return f"{plan.total_bytes_per_device / GIB:.1f} {'yes' if plan.fits else 'no'}"


def rows() -> list[str]:
    out = []
    for name, (file, overrides) in MODELS.items():
        cfg = apply_overrides(
            load_config(CONFIGS / file), {**overrides, "model.model_config.seq_length": SEQ}.items()
        )
        batch = cfg["runner_config"]["batch_size"]
        limit = cfg["context"]["max_device_memory"]
        model = LlamaConfig.from_run_config(cfg)
        for mp in (1, *MODEL_PARALLEL_CHOICES):
            if indivisible(model, mp):
                continue
            cells = [
                cell(
                    apply_overrides(
                        cfg, [("parallel_config.model_parallel", mp), ("recompute_config.recompute", r)]
                    )
                )
                for r in (False, True)
            ]
            out.append(f"| {name} | {batch} | {limit} | {mp} | {cells[0]} | {cells[1]} |")
    return out


def main() -> None:
    print("| model | batch | max_device_memory | model_parallel | no recompute: GiB, fits | recompute |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows()))


if __name__ == "__main__":
    main()
