"""LoRA beside the Llama model, with MindFormers/MindPet parameter names.

A wrapped Linear keeps its `weight` (and a Qwen2 `bias`, which stays frozen) under the same name and
gains `mindpet_delta_lora_a` [r, in] and `mindpet_delta_lora_b` [out, r]; forward is
`W x + B(A(dropout(x))) * alpha / r`. A starts He-uniform (kaiming uniform with a=sqrt(5), as MindPet
and PEFT), B zeros, so a fresh adapter changes nothing. A tied output head is the embedding table,
not a Linear, so it takes no LoRA.

Under tensor parallelism the adapter follows its layer's split: a column-parallel layer (output
split) has A whole and B split by output rows; a row-parallel layer (input split) has A split by
input columns, its partial products summed over the ranks before B, which is whole.
"""

from __future__ import annotations

import math

from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import HeUniform, Zero, initializer

from llama_core.model.config import LORA_PREFIXES, LlamaConfig
from llama_core.model.llama import DTYPES, Linear
from llama_core.model.lora_config import LoraConfig

# MindPet's prefix first, then the older one.
LORA_PREFIX, _LEGACY_LORA_PREFIX = (f"{prefix}lora_" for prefix in LORA_PREFIXES)


def normalize_lora_name(name: str) -> str:
    """Parameter name with the older `tk_delta_lora_*` LoRA names mapped to `mindpet_delta_lora_*`."""
    return name.replace("." + _LEGACY_LORA_PREFIX, "." + LORA_PREFIX)


def is_lora_parameter(name: str) -> bool:
    return ("." + LORA_PREFIX) in normalize_lora_name(name)


class LoraLinear(Linear):
    """A Linear plus the low-rank update B(A(dropout(x))) * alpha / r."""

    def __init__(self, base: Linear, cfg: LoraConfig, config: LlamaConfig) -> None:
        # the same weight (and bias) Parameters: base weights already loaded stay in place
        super().__init__(
            *base.full_features, config, weight=base.weight, bias=base.bias, tp=base.tp, split=base.split
        )
        param_dtype = DTYPES[config.param_init_type]
        self.mindpet_delta_lora_a = Parameter(
            initializer(HeUniform(negative_slope=math.sqrt(5)), (cfg.rank, base.in_features), param_dtype),
            name="mindpet_delta_lora_a",
        )
        self.mindpet_delta_lora_b = Parameter(
            initializer(Zero(), (base.out_features, cfg.rank), param_dtype), name="mindpet_delta_lora_b"
        )
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(p=cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def construct(self, x: Tensor) -> Tensor:
        x = x.astype(self.compute_dtype)
        # scaled at rank width ([tokens, r]) rather than output width: the same product, less work.
        # Tensor parallel: a row-parallel A's partial products are summed here, and a column-parallel
        # B takes the replicated `down` as its input, as the base weight takes x.
        down = self.gather_output(self.project(self.dropout(x), self.mindpet_delta_lora_a)) * self.scaling
        base = self.add_bias(self.gather_output(self.project(self.scatter_input(x), self.weight)))
        return base + self.project(self.scatter_input(down), self.mindpet_delta_lora_b)


def apply_lora(model: nn.Cell, cfg: LoraConfig) -> list[str]:
    """Wrap every Linear whose cell name matches `cfg.target_modules` and freeze all non-LoRA parameters.

    Returns the wrapped cell names. Raises ConfigError when the regex matches no Linear.
    """
    config: LlamaConfig = model.config
    cells = dict(model.cells_and_names())
    linears = [n for n, c in cells.items() if isinstance(c, Linear) and not isinstance(c, LoraLinear)]
    targets = cfg.targets(linears)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = cells[parent_name]
        wrapped = LoraLinear(cells[name], cfg, config)
        setattr(parent, attr, wrapped)
        # parameter names are fixed when a cell is attached; give the new ones their full path
        wrapped.update_parameters_name(name + ".")
    for param in model.get_parameters():
        param.requires_grad = is_lora_parameter(param.name)
    return targets


def lora_num_parameters(config: LlamaConfig, cfg: LoraConfig) -> int:
    """Trainable LoRA parameters for a model config, without allocating (7B default LoRA: 16,777,216)."""
    return sum(
        cfg.rank * (out + inp) for name, (out, inp) in config.linear_shapes().items() if cfg.matches(name)
    )
