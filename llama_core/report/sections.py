"""The report model's longer parts: the data statistics, the training figures and the config's key
values (model.py puts them together). Plain JSON data, numbers left unformatted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_core.report.values import count, get, num, series

IDS_SHOWN = 5  # fully masked records named by id; the count says how many there were

# The config values a reader needs to tell two runs apart (the whole config is in report.json).
KEY_CONFIG_VALUES = (
    "run_mode",
    "seed",
    "load_checkpoint",
    "runner_config.epochs",
    "runner_config.batch_size",
    "runner_config.gradient_accumulation_steps",
    "runner_config.length_buckets",
    "lr_schedule.type",
    "lr_schedule.learning_rate",
    "lr_schedule.warmup_ratio",
    "lr_schedule.lr_end",
    "lr_schedule.total_steps",
    "optimizer.type",
    "optimizer.weight_decay",
    "runner_wrapper.max_grad_norm",
    "parallel_config.data_parallel",
    "model.model_config.seq_length",
    "do_eval",
    "eval_step_interval",
)


def _holdout(holdout: Any) -> dict[str, Any] | None:
    if not isinstance(holdout, Mapping):
        return None
    fraction = num(holdout.get("fraction"))
    return {
        "records": holdout.get("records"),
        "percent": None if fraction is None else 100 * fraction,
        "supervised_tokens": holdout.get("supervised_tokens"),
        "output_file": holdout.get("output_file") or None,
    }


def _layout(packing: Any) -> dict[str, Any] | None:
    """How records sit in the rows: mode "none" is one record per row (MindFormers' records)."""
    if not isinstance(packing, Mapping) or not packing:
        return None
    counted = packing.get("documents") is not None and packing.get("rows") is not None
    return {
        "mode": packing.get("mode", "?"),
        "documents": packing.get("documents") if counted else None,
        "rows": packing.get("rows") if counted else None,
        "fill_ratio": num(packing.get("fill_ratio")),
        "documents_per_row_mean": packing.get("documents_per_row_mean"),
    }


def data_view(data: Any) -> dict[str, Any] | None:
    """The tokenize stage's data report; None when there was none."""
    if not isinstance(data, Mapping) or not data:
        return None
    masked = data.get("records_fully_masked")
    ids = (masked.get("first_ids") if isinstance(masked, Mapping) else None) or []
    return {
        "records_written": data.get("records_written"),
        "holdout": _holdout(data.get("holdout")),
        "fully_masked": {
            "count": count(masked),
            "first_ids": list(ids[:IDS_SHOWN]),
            "more_ids": len(ids) > IDS_SHOWN,
        },
        "truncated": count(data.get("records_truncated")),
        "supervised_tokens": data.get("supervised_tokens"),
        "seq_length": data.get("seq_length"),
        "layout": _layout(data.get("packing")),
        "dataset_type": data.get("dataset_type"),
        "chat_template": data.get("chat_template"),
        "masking": data.get("masking"),
        "output_file": data.get("output_file") or None,
    }


def _length_buckets(buckets: Any) -> dict[str, Any] | None:
    if not isinstance(buckets, Mapping) or not buckets:
        return None
    per = buckets.get("micro_batches_per_bucket")
    return {
        "enabled": bool(buckets.get("enabled")),
        "sizes": list(buckets.get("sizes") or []),
        "micro_batches": [[k, v] for k, v in per.items()] if isinstance(per, Mapping) else [],
        "compiles": buckets.get("compiles"),
        "compile_seconds": buckets.get("compile_seconds"),
    }


def training_view(train: Any) -> dict[str, Any] | None:
    """The train summary's figures; None when there was none."""
    if not isinstance(train, Mapping) or not train:
        return None
    keys = (
        "world_size",
        "global_batch_size",
        "gradient_accumulation_steps",
        "seq_length",
        "steps",
        "tokens_per_second_per_device",
        "tokens_per_second_total",
        "final_loss",
        "eval_loss",
    )
    return {
        **{key: train.get(key) for key in keys},
        "evals": len(series(train.get("eval_series"))),
        "length_buckets": _length_buckets(train.get("length_buckets")),
        "resumed_from": train.get("resumed_from") or None,
        "last_checkpoint": train.get("last_checkpoint") or None,
    }


def config_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's file and digest, its LoRA settings (pet_config) and its key values."""
    resolved = config.get("resolved") or {}
    pet = get(resolved, "model.model_config.pet_config") or resolved.get("pet_config")
    missing = object()
    values = [(key, get(resolved, key, missing)) for key in KEY_CONFIG_VALUES]
    return {
        "path": config.get("path") or None,
        "digest": config.get("digest", "—"),
        "pet_config": [[k, v] for k, v in pet.items()] if isinstance(pet, Mapping) else [],
        "values": [[key, value] for key, value in values if value is not missing],
    }
