"""After the fine-tune: the weights in the forms people use them in, published as Airflow Assets.

`export_adapter` writes the final LoRA weights as a PEFT adapter folder (`run_dir/adapter`, loads with
`peft.PeftModel.from_pretrained` on the HF base); `export_merged`, when asked, the merged full model as
a MindSpore .ckpt and as an HF safetensors folder (`run_dir/merged/`). Each task's outlet Asset gets an
event whose extra says where this run's output is and what made it, so a serving or evaluation DAG
scheduled on the Asset finds everything it needs there (dags/llama_lora_adapter_check.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from operators.evaluate import write_resolved_config
from operators.stages import StageOperator


class _PublishingOperator(StageOperator):
    """A stage whose result is published on its outlet Assets, with the run's metadata as extra."""

    def publish(self, context: Context, extra: Mapping[str, Any]) -> None:
        dag_run = context["dag_run"]
        logical_date = getattr(dag_run, "logical_date", None)
        doc = {
            "dag_id": dag_run.dag_id,
            "run_id": dag_run.run_id,
            "logical_date": logical_date.isoformat() if logical_date else None,
            **extra,
        }
        for asset in self.outlets:
            context["outlet_events"][asset].extra = doc
        self.log.info("published %s: %s", [a.name for a in self.outlets], doc)


class ExportAdapterOperator(_PublishingOperator):
    """The run's final LoRA weights -> a PEFT adapter folder, `run_dir/adapter`."""

    template_fields: Sequence[str] = (
        "run_dir", "config", "overrides", "base_model", "base_checkpoint", "tokenizer", "seq_length",
        "prompts", "max_new_tokens", "chat_template",
    )  # fmt: skip
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        run_dir: str,
        config: str,
        base_model: str,
        base_checkpoint: str,
        tokenizer: str,
        overrides: Mapping[str, Any] | str | None = None,
        seq_length: int | str | None = None,
        prompts: Sequence[str | Mapping[str, str]] | str = (),
        max_new_tokens: int | str | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.config, self.overrides, self.base_model = run_dir, config, overrides, base_model
        self.base_checkpoint, self.tokenizer, self.seq_length = base_checkpoint, tokenizer, seq_length
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.chat_template = chat_template

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.checkpoint.export_peft import export_peft
        from llama_core.checkpoint.unshard import complete_checkpoint
        from llama_core.report import config_digest
        from llama_core.results import to_jsonable

        config_path, cfg = write_resolved_config(self.run_dir, self.config, self.overrides, self.seq_length)
        final = complete_checkpoint(self.run_dir, "run folder")  # its final checkpoint, whole
        result = export_peft(final, Path(self.run_dir) / "adapter", self.base_model, config=cfg)
        self.publish(
            context,
            {
                "adapter": str(result.output_dir),
                "base_model": self.base_model,
                "base_checkpoint": self.base_checkpoint,
                "finetuned_checkpoint": str(final),
                "config": str(config_path),
                "config_digest": config_digest(cfg),
                "tokenizer": self.tokenizer,
                "chat_template": self.chat_template or None,  # how the prompts were wrapped (None: default)
                "prompts": list(self.prompts or []),
                "max_new_tokens": None if self.max_new_tokens in (None, "") else int(self.max_new_tokens),
                "lora_rank": result.rank,
                "target_modules": result.target_modules,
            },
        )
        return {**to_jsonable(result), "finetuned_checkpoint": str(final)}


class ExportMergedOperator(_PublishingOperator):
    """Base + LoRA merged -> `run_dir/merged/llama2_lora_merged.ckpt` and `run_dir/merged/hf/`
    (safetensors); skipped unless `enabled`."""

    template_fields: Sequence[str] = (
        "enabled",
        "run_dir",
        "config",
        "overrides",
        "base_checkpoint",
        "seq_length",
    )
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        enabled: bool | str,
        run_dir: str,
        config: str,
        base_checkpoint: str,
        overrides: Mapping[str, Any] | str | None = None,
        seq_length: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.enabled, self.run_dir, self.config = enabled, run_dir, config
        self.base_checkpoint, self.overrides, self.seq_length = base_checkpoint, overrides, seq_length

    def run_stage(self, context: Context) -> dict[str, Any]:
        if str(self.enabled).lower() not in ("true", "1"):
            raise AirflowSkipException("export_merged is off for this run (param export_merged)")
        from llama_core.checkpoint.convert import convert_ms_to_hf
        from llama_core.checkpoint.merge_lora import merge_lora
        from llama_core.checkpoint.unshard import complete_checkpoint
        from llama_core.report import config_digest

        config_path, cfg = write_resolved_config(self.run_dir, self.config, self.overrides, self.seq_length)
        final = complete_checkpoint(self.run_dir, "run folder")  # its final checkpoint, whole
        folder = Path(self.run_dir) / "merged"
        merged = merge_lora(self.base_checkpoint, folder / "llama2_lora_merged.ckpt", final, config=cfg)
        hf = convert_ms_to_hf(merged.output_path, folder / "hf", config=cfg)
        out = {
            "merged_checkpoint": str(merged.output_path),
            "hf_folder": str(hf.output_path),
            "merged_linears": len(merged.merged),
            "cached": merged.cached and hf.cached,
        }
        self.publish(
            context,
            {
                **out,
                "finetuned_checkpoint": str(final),
                "config": str(config_path),
                "config_digest": config_digest(cfg),
            },
        )
        return out
