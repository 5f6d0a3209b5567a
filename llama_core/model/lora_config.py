"""LoRA's settings (MindFormers' `pet_config`) and which Linear layers they wrap, without MindSpore:
`apply_lora` wraps the layers `LoraConfig.targets` picks from the built model's cells, and validate
checks a request with the same function over the names `LlamaConfig.linear_shapes` gives."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from llama_core.errors import ConfigError


@dataclasses.dataclass
class LoraConfig:
    """LoRA settings (docs/REFERENCE.md, config values). `target_modules` is matched with re.match against
    Linear cell names such as `model.layers.0.attention.wq`, as MindFormers does; a list of regexes is
    read as their alternation."""

    rank: int = 16
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str = r".*wq|.*wk|.*wv|.*wo"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"pet_config.lora_rank must be a positive integer, got {self.rank!r}")
        if not _number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"pet_config.lora_alpha must be a positive number, got {self.alpha!r}")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"pet_config.lora_dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, list) and targets and all(isinstance(p, str) and p for p in targets):
            self.target_modules = "|".join(f"(?:{p})" for p in targets)
        if not isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError(
                f"pet_config.target_modules must be a regex or a list of them, got {self.target_modules!r}"
            )
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise ConfigError(
                f"pet_config.target_modules {self.target_modules!r} is not a regex: {exc}"
            ) from exc

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_pet_config(cls, pet_config: Mapping[str, Any]) -> LoraConfig:
        """Build from MindFormers' `model.model_config.pet_config` (pet_type lora, lora_rank, lora_alpha,
        lora_dropout, target_modules); other keys raise ConfigError naming them."""
        names = {
            "lora_rank": "rank",
            "lora_alpha": "alpha",
            "lora_dropout": "dropout",
            "target_modules": "target_modules",
        }
        pet_type = pet_config.get("pet_type", "lora")
        if pet_type != "lora":
            raise ConfigError(f"pet_config.pet_type {pet_type!r} is not supported (only 'lora')")
        unknown = sorted(k for k in pet_config if k not in names and k != "pet_type")
        if unknown:
            raise ConfigError(f"pet_config: unknown key(s) {', '.join(unknown)}")
        return cls(**{names[k]: v for k, v in pet_config.items() if k in names})

    def matches(self, cell_name: str) -> bool:
        return re.match(self.target_modules, cell_name) is not None

    def targets(self, linear_names: Iterable[str]) -> list[str]:
        """The Linear layers (by cell name) LoRA wraps; ConfigError when the regex matches none."""
        targets = [name for name in linear_names if self.matches(name)]
        if not targets:
            raise ConfigError(f"pet_config.target_modules {self.target_modules!r} matches no Linear layer")
        return targets


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
