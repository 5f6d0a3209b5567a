"""Load a MindSpore checkpoint into a built model, refusing to silently leave weights unloaded."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mindspore as ms
from mindspore import nn

from llama_core.errors import InputError
from llama_core.model.lora import is_lora_parameter, normalize_lora_name

logger = logging.getLogger("llama_core.model")

# Training state MindFormers checkpoints may carry beside the weights (docs/REFERENCE.md, parameter names).
TRAINING_STATE = re.compile(
    r"^(global_step|epoch_num|step_num|loss_scale|current_iterator_step|adam_[mv]\..*)$"
)


def load_weights(
    model: nn.Cell, ckpt_path: str | Path, *, allow_missing_lora: bool = True, lora_over_base: bool = False
) -> list[str]:
    """Load `ckpt_path` into `model` (older `tk_delta_` LoRA names accepted). Returns the loaded names.

    Raises InputError naming the tensors when a model weight is missing from the checkpoint (LoRA
    weights may be missing when `allow_missing_lora`: a base checkpoint for a fresh adapter; with
    `lora_over_base` it is the other way round: every LoRA weight must be there and the base weights
    may be missing, as in a fine-tune's LoRA-only checkpoint loaded over base weights already in the
    model), when the checkpoint holds a weight the model does not have, or when a shape differs.
    Training state (`global_step`, `adam_m.*`...) is skipped. Weights are cast to the model's
    parameter dtype.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        stored = {normalize_lora_name(k): v for k, v in ms.load_checkpoint(str(path)).items()}
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable MindSpore checkpoint ({exc})") from exc
    params = {p.name: p for p in model.get_parameters()}
    unexpected = sorted(k for k in stored if k not in params and not TRAINING_STATE.match(k))
    may_miss = (
        (lambda k: not is_lora_parameter(k))
        if lora_over_base
        else (lambda k: allow_missing_lora and is_lora_parameter(k))
    )
    missing = sorted(k for k in params if k not in stored and not may_miss(k))
    if unexpected or missing:
        raise InputError(
            f"{path}: checkpoint does not fit the model: "
            f"missing {_preview(missing)}; not in the model {_preview(unexpected)}"
        )
    loaded = []
    for name, param in params.items():
        if name not in stored:
            continue
        value = stored[name]
        if tuple(value.shape) != tuple(param.shape):
            raise InputError(
                f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.set_data(value.astype(param.dtype) if value.dtype != param.dtype else value)
        loaded.append(name)
    kept = len(params) - len(loaded)
    logger.info(
        "loaded %d tensors from %s (%d %s tensors keep their values)",
        len(loaded), path, kept, "base" if lora_over_base else "LoRA",
    )  # fmt: skip
    return loaded


def _preview(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
