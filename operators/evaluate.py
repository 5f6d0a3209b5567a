"""After the fine-tune: the base and the fine-tuned model side by side (held-out loss, generations)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from operators.stages import StageOperator, run_config

RESOLVED_CONFIG = "resolved_config.yaml"


def write_resolved_config(
    run_dir: str | Path, config: str, overrides: Mapping[str, Any] | str | None, seq_length: Any
) -> tuple[Path, dict[str, Any]]:
    """The run's config as the ranks trained with it (overrides and seq_length applied), written once
    to `run_dir/resolved_config.yaml` (atomically): what evaluation, export and the report read."""
    import yaml

    from llama_core.atomic import write_bytes_atomic

    cfg = run_config(config, overrides, seq_length)
    path = Path(run_dir) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, yaml.safe_dump(cfg, sort_keys=False).encode())
    return path, cfg


class _EvaluationRunner(StageOperator):
    """Runs `llama_core.evaluation` in a child process on one device (MindSpore stays out of the task
    process): its output streams into the task log, and stopping the task stops it (`on_kill`), as
    BashOperator does."""

    def __init__(self, *, device_target: str = "Ascend", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device_target = device_target
        self._hook: Any = None

    def evaluate(
        self,
        work: Path,
        *,
        config: Path,
        base: str,
        finetuned: Path,
        output: Path,
        tokenizer: str,
        prompts: list[str | dict[str, str]],  # strings or {"prompt", "expect"}
        max_new_tokens: int | str | None,
        eval_data: str | None = None,
        chat_template: str | None = None,
    ) -> dict[str, Any]:
        """Run `llama_core.evaluation` in a child process in `work` (its output in the task log, stopped
        by `on_kill`) and return the result it wrote to `output`."""
        from airflow.providers.standard.hooks.subprocess import SubprocessHook

        from llama_core.atomic import write_json_atomic

        cmd = [
            sys.executable, "-m", "llama_core.evaluation",
            "--config", str(config),
            "--base_checkpoint", base,
            "--finetuned_checkpoint", str(finetuned),
            "--output_path", str(output),
            "--tokenizer", tokenizer,
            "--device_target", self.device_target,
        ]  # fmt: skip
        if eval_data:
            cmd += ["--eval_data", eval_data]
        if chat_template:
            cmd += ["--chat_template", chat_template]
        if prompts:
            cmd += ["--prompts_file", str(write_json_atomic(work / "evaluation_prompts.json", prompts))]
        if max_new_tokens not in (None, ""):
            cmd += ["--max_new_tokens", str(int(max_new_tokens))]
        self._hook = SubprocessHook()
        result = self._hook.run_command(cmd, cwd=str(work))
        if result.exit_code != 0:
            raise AirflowFailException(
                f"evaluation failed (exit code {result.exit_code}): {result.output}; the lines above say why"
            )
        return json.loads(output.read_text())

    def on_kill(self) -> None:
        if self._hook is not None:
            self._hook.send_sigterm()


class EvaluateOperator(_EvaluationRunner):
    """Evaluate the base model and the fine-tuned one (`llama_core.evaluation`): loss and
    perplexity on the held-out split, and greedy answers to the fixed prompts, before and after.

    It runs on the NPU nodes' queue and pool (the DAG sets them). The result is written to
    `run_dir/evaluation.json` and is the task's XCom; a re-run with the same checkpoints, data and
    prompts finds it in the cache.
    """

    template_fields: Sequence[str] = (
        "config", "overrides", "base_checkpoint", "run_dir", "eval_data", "tokenizer", "chat_template",
        "prompts", "max_new_tokens", "seq_length", "device_target",
    )  # fmt: skip
    ui_color = "#fdebd0"

    def __init__(
        self,
        *,
        config: str,
        base_checkpoint: str,
        run_dir: str,
        tokenizer: str,
        chat_template: str | None = None,
        overrides: Mapping[str, Any] | str | None = None,
        eval_data: str | None = None,
        prompts: Sequence[str | Mapping[str, str]] | str = (),
        max_new_tokens: int | str | None = None,
        seq_length: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config, self.overrides, self.base_checkpoint = config, overrides, base_checkpoint
        self.run_dir, self.eval_data, self.tokenizer, self.prompts = run_dir, eval_data, tokenizer, prompts
        self.max_new_tokens, self.seq_length = max_new_tokens, seq_length
        self.chat_template = chat_template

    def run_stage(self, context: Context) -> dict[str, Any]:
        config_path, _ = write_resolved_config(self.run_dir, self.config, self.overrides, self.seq_length)
        evaluation = self.evaluate(
            Path(self.run_dir),
            config=config_path,
            base=self.base_checkpoint,
            finetuned=Path(self.run_dir) / "checkpoint",
            output=Path(self.run_dir) / "evaluation.json",
            tokenizer=self.tokenizer,
            prompts=json.loads(self.prompts) if isinstance(self.prompts, str) else list(self.prompts or []),
            max_new_tokens=self.max_new_tokens,
            eval_data=self.eval_data,
            chat_template=self.chat_template or None,  # a null param may render as ""
        )
        base, tuned = evaluation["base"], evaluation["finetuned"]
        self.log.info(
            "held-out loss: base %s -> fine-tuned %s", base.get("eval_loss"), tuned.get("eval_loss")
        )
        return evaluation


class AdapterCheckOperator(_EvaluationRunner):
    """For a DAG scheduled on a pipeline's adapter Asset: load the newest published PEFT adapter (the
    event's extra says where it is and what it was trained from), import it back into MindSpore on its
    base weights and answer the pipeline's fixed prompts with it. Where the producing run evaluated the
    same prompts, the answers must be the same: the adapter a consumer receives is the model that was
    evaluated. Writes `<adapter>/../adapter_check/<this run_id>.json`."""

    def __init__(self, *, asset: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asset = asset

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.checkpoint.import_peft import import_peft

        events = context["triggering_asset_events"].get(self.asset) or []
        if not events:
            raise AirflowFailException(f"no event of Asset {self.asset.name} triggered this run")
        extra = events[-1].extra
        adapter = Path(extra["adapter"])
        check_dir = adapter.parent / "adapter_check"
        imported = import_peft(adapter, check_dir / "adapter_lora.ckpt")
        self.log.info("adapter %s of run %s imported: %s", adapter, extra.get("run_id"), imported)
        checked = self.evaluate(
            check_dir,
            config=Path(extra["config"]),
            base=extra["base_checkpoint"],
            finetuned=imported.output_path,
            output=check_dir / f"{context['run_id']}.json".replace(":", "_"),
            tokenizer=extra["tokenizer"],
            chat_template=extra.get("chat_template"),  # the run's, so the answers can be equal
            prompts=extra.get("prompts") or [],
            max_new_tokens=extra.get("max_new_tokens"),  # the answers' length the run evaluated
        )
        answers = checked["finetuned"]["generations"]
        for answer in answers:
            self.log.info("prompt %r -> %r", answer["prompt"], answer["output"])
        produced = adapter.parent / "evaluation.json"
        if produced.is_file():
            evaluated = json.loads(produced.read_text())["finetuned"]["generations"]
            if evaluated != answers:
                raise AirflowFailException(
                    f"the adapter answers differently from the fine-tuned model its run evaluated "
                    f"({produced}): {answers} != {evaluated}"
                )
            self.log.info("the adapter gives the answers the run's evaluation recorded (%s)", produced)
        return {"adapter": str(adapter), "source_run": extra.get("run_id"), "generations": answers}
