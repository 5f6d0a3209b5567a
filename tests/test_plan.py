"""The memory plan (`llama_core.plan`): its arithmetic, its refusal in validate, and its CPU figure
against the measured peak memory of real training steps.

Calibration (`test_the_plan_is_within_20_percent_of_a_measured_step`): each case runs one full
training step (forward, backward, clipping, AdamW) in a fresh Python process (`python
tests/test_plan.py CASE_JSON`), MindSpore graph mode on CPU, with the trainer's own pieces:
`components.build_model` (LoRA, recompute_config), `components.adamw`, `TrainStep`. Measured =
- the parameters: the process's RSS growth from before the model exists to once model, optimizer and
  step cell exist (MindSpore keeps CPU parameters in host memory, outside its pool), plus
- the step's peak in MindSpore's memory pool, which holds every tensor a step computes: its "actual
  peak used mem", which MindSpore prints at exit under MS_DEV_RUNTIME_CONF=memory_statistics:True.
That sum is the CPU counterpart of what `context.max_device_memory` bounds on an NPU (the same
runtime's pool, plus the weights), which is what the plan claims. The process's RSS is printed too
but not compared: on CPU it also holds the graph executor's host memory (2-5 GiB for these cases,
growing with layers and activations; `ms.jit` over the same model's value_and_grad held none of it:
0.40 against 1.63 GiB for one layer), which an NPU keeps in host RAM. The pool is exact to the MiB
and deterministic for a given graph, so the cases are small (0.3-1.6 GiB) and the five take about
a minute. A fresh process per case: the pool keeps what a step freed, and its peak only rises.

A case with model_parallel > 1 runs the probe on that many msrun ranks, each building its slice of
the model in its tensor-parallel group; every rank's measure is held to the plan, which is per
device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from llama_core.config import apply_overrides, load_config
from llama_core.errors import ConfigError
from llama_core.plan import GIB, check_fits, memory_plan
from llama_core.validate import check_config, validate_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "lora_llama2_tiny.yaml"
SEVEN_B = CONFIGS / "lora_llama2_7b.yaml"
# Meta's published parameter count of Llama 2 7B (HF's model.num_parameters() gives the same).
LLAMA2_7B_PARAMETERS = 6_738_415_616


def seven_b(**overrides: Any) -> dict[str, Any]:
    return apply_overrides(load_config(SEVEN_B), overrides.items())


# -- arithmetic


def test_base_weights_of_llama2_7b_in_bf16() -> None:
    plan = memory_plan(seven_b(**{"model.model_config.param_init_type": "bfloat16"}))
    assert plan.terms["base_weights"].bytes == 2 * LLAMA2_7B_PARAMETERS


def test_lora_of_llama2_7b_default_targets() -> None:
    # rank 16 on wq, wk, wv, wo of 32 layers, each 4096 x 4096: 32 * 4 * 16 * (4096 + 4096)
    lora = 32 * 4 * 16 * (4096 + 4096)
    assert lora == 16_777_216
    plan = memory_plan(seven_b())  # param_init_type float32
    assert plan.terms["trainable_parameters"].bytes == 4 * lora
    assert plan.terms["gradients"].bytes == 4 * lora
    assert plan.terms["optimizer_state"].bytes == 2 * 4 * lora
    assert plan.terms["gradient_accumulation"].bytes == 0
    accumulated = memory_plan(seven_b(**{"runner_config.gradient_accumulation_steps": 4}))
    assert accumulated.terms["gradient_accumulation"].bytes == 4 * lora


def test_model_parallel_2_halves_what_it_splits() -> None:
    one, two = memory_plan(seven_b()), memory_plan(seven_b(**{"parallel_config.model_parallel": 2}))
    norms = (2 * 32 + 1) * 4096  # replicated on every rank
    assert two.terms["base_weights"].bytes == 4 * ((LLAMA2_7B_PARAMETERS - norms) // 2 + norms)
    # wq/wk/wv: A [16, 4096] whole, B [2048, 16]; wo: A [16, 2048], B [4096, 16] whole
    assert two.terms["trainable_parameters"].bytes == 4 * 32 * 4 * 16 * (4096 + 2048)
    tokens = 2 * 4096
    assert two.terms["loss_buffers"].bytes == 4 * 1024 * 16000 * 4 + 8 * tokens
    assert one.terms["loss_buffers"].bytes == 4 * 1024 * 32000 * 4 + 8 * tokens
    # activations: everything per head or per FFN column halves; the fp32 norm inputs (2 per
    # layer), the final norm's in/out (fp32 + bf16) and the whole-width inputs of the column-split
    # wq/wk/wv's LoRA A (dropout output in bf16 + a 1-bit Ascend mask each) do not
    unsplit = 32 * 2 * tokens * 4096 * 4 + tokens * 4096 * (4 + 2)
    unsplit += 32 * 3 * tokens * 4096 * (2 + 1 / 8)
    split_one = one.terms["activations"].bytes - unsplit
    split_two = two.terms["activations"].bytes - unsplit
    lora_down = 32 * 4 * tokens * 16 * 2  # each target's [tokens, rank] input of B, never split
    assert split_two - lora_down == pytest.approx((split_one - lora_down) / 2, rel=1e-6)


def test_fewer_kv_heads_than_ranks_are_whole_on_every_rank() -> None:
    # the 70B config (model_parallel 8, bf16, LoRA r 8 on wq and wv) with 4 kv heads instead of 8
    cfg = apply_overrides(
        load_config(CONFIGS / "lora_llama2_70b.yaml"), [("model.model_config.n_kv_heads", 4)]
    )
    plan = memory_plan(cfg)
    h, ffn, layers, vocab, kv = 8192, 28672, 80, 32000, 4 * 128
    # wq and wo split 8 ways, wk and wv [512, 8192] whole, the FFN split, the norms whole
    layer = 2 * h * h // 8 + 2 * kv * h + 3 * h * ffn // 8 + 2 * h
    assert plan.terms["base_weights"].bytes == 2 * (layers * layer + 2 * vocab // 8 * h + h)
    # wq: A [8, 8192] whole, B [1024, 8]; wv: A and B [512, 8] whole
    assert plan.terms["trainable_parameters"].bytes == 2 * layers * 8 * ((h + h // 8) + (h + kv))


def test_recompute_keeps_each_layer_input_and_one_layer() -> None:
    full = memory_plan(seven_b())
    recomputed = memory_plan(seven_b(**{"recompute_config.recompute": True}))
    tokens, layers = 2 * 4096, 32
    outside = tokens * 4096 * (4 + 2)
    per_layer = (full.terms["activations"].bytes - outside) / layers
    inputs = layers * tokens * 4096 * 2  # bf16 layer inputs (flash attention: no probabilities kept)
    assert recomputed.terms["activations"].bytes == inputs + outside
    assert recomputed.terms["recomputed_layer"].bytes == pytest.approx(per_layer)
    assert recomputed.peak_phase == "a decoder layer's backward"
    assert not recomputed.terms["loss_buffers"].at_peak and recomputed.terms["recomputed_layer"].at_peak
    assert full.peak_phase == "the loss's backward" and full.terms["recomputed_layer"].bytes == 0
    # the bf16 weight copies the matmul gradients read: the recomputed layer's, not every layer's
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert full.terms["weight_compute_copies"].bytes == 2 * (32 * layer + 32000 * 4096)
    assert recomputed.terms["weight_compute_copies"].bytes == 2 * layer
    at_peak = sum(t.bytes for t in recomputed.terms.values() if t.at_peak)
    assert recomputed.total_bytes_per_device == at_peak < full.total_bytes_per_device


def test_attention_scores_count_unless_flash() -> None:
    eager = {"model.model_config.use_flash_attention": False}
    plain = memory_plan(seven_b(**eager))
    flash = memory_plan(seven_b())
    batch, heads, seq, layers, tokens = 2, 32, 4096, 32, 2 * 4096
    # log-softmax and probabilities in fp32, and the probabilities cast to bf16 for the matmul,
    # against flash attention's output and [b, n, s, 8] fp32 max and sum
    scores = batch * heads * seq * seq * (4 + 4 + 2)
    flash_extra = tokens * 4096 * 2 + 2 * batch * heads * seq * 8 * 4
    assert plain.terms["activations"].bytes - flash.terms["activations"].bytes == layers * (
        scores - flash_extra
    )
    # select_recompute's cells hand their outputs to matmuls that keep them: nothing saved (measured)
    select = memory_plan(seven_b(**eager, **{"recompute_config.select_recompute": True}))
    assert select.total_bytes_per_device == plain.total_bytes_per_device


def test_a_model_parallel_that_does_not_divide_the_model_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model_parallel 3 does not divide.*num_heads 32"):
        memory_plan(seven_b(**{"parallel_config.model_parallel": 3}))


def test_cli_prints_the_plan_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    from llama_core.console import main

    assert main(["plan", "--config", str(SEVEN_B), "--runner_config.batch_size", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["batch_size"] == 1 and doc["max_device_memory"] == "59GB"
    assert doc["total_bytes_per_device"] == sum(t["bytes"] for t in doc["terms"].values() if t["at_peak"])
    assert all(t["why"] for t in doc["terms"].values())


# -- the refusal


@pytest.fixture
def roomy_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7B run keeps ~1 TiB of full checkpoints: these tests are about device memory, so the free-space
    check (tests/test_disk_full.py) sees a disk with room for it, whatever the machine has."""
    monkeypatch.setattr("llama_core.space.free_bytes", lambda path: 1 << 50)


def _params(tmp_path: Path, config: Path, seq_length: int, overrides: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "alpaca.json").write_text("[]")
    return {
        "alpaca_url": str(tmp_path / "alpaca.json"),
        "tokenizer_url": str(tmp_path / "alpaca.json"),
        "weights_url": str(tmp_path / "alpaca.json"),
        "work_dir": str(tmp_path / "work"),
        "config": str(config),
        "overrides": overrides,
        "seq_length": seq_length,
        "device_target": "Ascend",
    }


@pytest.mark.usefixtures("roomy_disk")
def test_validate_refuses_a_plan_over_the_device_memory_and_says_what_fits(tmp_path: Path) -> None:
    overrides = {"runner_config.batch_size": 4}
    params = _params(tmp_path, SEVEN_B, 4096, overrides)
    with pytest.raises(ConfigError) as refused:
        validate_run(params, tmp_path)
    message = str(refused.value)
    assert message.startswith("param 'config': the memory plan needs")
    assert "over context.max_device_memory 59GB" in message
    assert "largest term: activations" in message
    fixes = message.split("would fit: ", 1)[1].split(", ")
    assert any("recompute_config.recompute True" in fix for fix in fixes)
    # every fix named does fit once applied
    cfg = apply_overrides(load_config(SEVEN_B), overrides.items())
    for fix in fixes:
        changes = [part.rsplit(" ", 1) for part in fix.split(" (")[0].split(" + ")]
        fixed = apply_overrides(cfg, [(key, json.loads(value.lower())) for key, value in changes])
        assert memory_plan(fixed, "Ascend").fits, fix


@pytest.mark.usefixtures("roomy_disk")
def test_validate_passes_what_fits_and_leaves_cpu_alone(tmp_path: Path) -> None:
    fits = {"recompute_config.recompute": True}
    assert validate_run(_params(tmp_path, SEVEN_B, 4096, fits), tmp_path).world_size == 8
    # the same request on CPU ranks: no device memory to hold it to
    too_big = {**_params(tmp_path, SEVEN_B, 4096, {"runner_config.batch_size": 4}), "device_target": "CPU"}
    assert validate_run(too_big, tmp_path).device_target == "CPU"


@pytest.mark.parametrize(
    ("dag_id", "per_device_lora"),
    [
        # r 8 on wq, wv of 40 layers of 5120 x 5120, data parallel: whole on every rank
        ("llama2_13b_lora_alpaca", 40 * 2 * 8 * (5120 + 5120)),
        # r 8 on wq [8192, 8192] and wv [1024, 8192] of 80 layers, column-split 8 ways: A whole, B / 8
        ("llama2_70b_lora_alpaca", 80 * 8 * ((8192 + 8192 // 8) + (8192 + 1024 // 8))),
    ],
)
def test_the_13b_and_70b_pipelines_fit_one_node(dag_id: str, per_device_lora: int) -> None:
    from operators.pipeline_file import load_pipeline

    spec = load_pipeline(CONFIGS / "pipelines" / f"{dag_id}.yaml")
    cfg, world_size = check_config(
        spec.config_path, spec.overrides, spec.data.seq_length, spec.cluster.device_target, spec.cluster.nodes
    )  # what the DAG's validate task runs: the plan included
    assert (world_size, spec.cluster.device_target, spec.data.seq_length) == (8, "Ascend", 4096)
    plan = memory_plan(cfg)
    assert plan.fits and plan.recompute
    assert plan.terms["trainable_parameters"].bytes == per_device_lora * 2  # fp16 / bf16


def test_the_refusal_of_a_70b_request_is_fast() -> None:
    cfg = seven_b(
        **{
            "model.model_config.hidden_size": 8192,
            "model.model_config.num_layers": 80,
            "model.model_config.num_heads": 64,
        }
    )
    cfg["model"]["model_config"].update(n_kv_heads=8, intermediate_size=28672)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="largest term: base_weights"):
        check_fits(cfg, "Ascend")
    assert time.perf_counter() - start < 1.0


# -- calibration against measured steps


@dataclass(frozen=True)
class Case:
    """A small Llama (fp32, LoRA rank 8 on q/k/v/o, dropout 0.05) trained one step on CPU, its
    recompute_config applied by `components.build_model`."""

    seq: int
    batch: int
    recompute: bool = False
    select_recompute: bool = False
    model_parallel: int = 1
    layers: int = 3
    hidden: int = 512
    heads: int = 8
    vocab: int = 8000

    def config(self) -> dict[str, Any]:
        overrides = {
            "model.model_config.seq_length": self.seq,
            "model.model_config.max_position_embedding": self.seq,
            "model.model_config.hidden_size": self.hidden,
            "model.model_config.num_layers": self.layers,
            "model.model_config.num_heads": self.heads,
            "model.model_config.vocab_size": self.vocab,
            "model.model_config.pet_config.lora_rank": 8,
            "runner_config.batch_size": self.batch,
            "recompute_config.recompute": self.recompute,
            "recompute_config.select_recompute": self.select_recompute,
            "parallel_config.data_parallel": 1,
            "parallel_config.model_parallel": self.model_parallel,
            "use_parallel": self.model_parallel > 1,
        }
        return apply_overrides(load_config(TINY), overrides.items())


CASES = {
    "seq1024-batch2-vocab32000": Case(seq=1024, batch=2, vocab=32000),
    "seq512-batch4-recompute": Case(seq=512, batch=4, recompute=True),
    "seq2048-batch1": Case(seq=2048, batch=1),
    "seq1024-batch4-select_recompute": Case(seq=1024, batch=4, select_recompute=True),
    "seq1024-batch2-model_parallel2": Case(seq=1024, batch=2, model_parallel=2, vocab=32000),
}
# printed by MindSpore at exit with MS_DEV_RUNTIME_CONF=memory_statistics:True (MiB)
POOL_PEAK = re.compile(r"actual peak used mem:(\d+)M")


def measure(case: Case) -> dict[str, int]:
    """The bytes the step's parameters take, as the process's RSS growth once model, optimizer and
    step exist; then one step runs, and MindSpore prints its memory pool's peak at exit. Runs in a
    fresh process: `python tests/test_plan.py CASE_JSON`."""
    import mindspore as ms
    import numpy as np

    from llama_core.config import TrainConfig
    from llama_core.train.components import adamw, build_model, setup_context
    from llama_core.train.step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    tc = TrainConfig.from_dict(case.config())
    rt = setup_context(tc)  # under msrun: the rank's tensor-parallel group
    ms.set_seed(0)
    baseline = _status_bytes("VmRSS")
    model = build_model(tc, rt.tp)  # recompute_config applied as the trainer does
    model.set_train(True)
    optimizer = adamw(list(model.trainable_params()), tc, np.full(1, 1e-4, np.float32))
    step = TrainStep(
        model,
        optimizer,
        loss_scale=tc.scale_sense,
        clip_norm=tc.max_grad_norm,
        tensor_parallel=(rt.tp, model.split_parameter_names()),
    )
    step.set_train(True)
    parameters = _status_bytes("VmRSS") - baseline
    ids = np.random.default_rng(0).integers(3, case.vocab, (case.batch, case.seq + 1)).astype(np.int32)
    loss, _norm = step(ms.Tensor(ids), ms.Tensor(ids))
    assert np.isfinite(loss.asnumpy())
    return {"parameters": parameters, "rss_growth": _status_bytes("VmHWM") - baseline}


def _status_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, int]]:
    """Every case measured in a fresh process of its own, two at a time (the figures are per process;
    compiling the graphs is what takes the time), then the tensor-parallel cases on their ranks."""
    env = {**os.environ, "MS_DEV_RUNTIME_CONF": "memory_statistics:True"}
    alone = [name for name, case in CASES.items() if case.model_parallel == 1]
    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(zip(alone, pool.map(lambda name: measured_alone(CASES[name], env), alone), strict=True))
    for name, case in CASES.items():
        if name not in out:
            out[name] = measured_on_ranks(case, env)
    return out


def measured_alone(case: Case, env: dict[str, str]) -> dict[str, int]:
    """The probe in one process: its figures and MindSpore's memory pool peak."""
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("{")))
    peaks = POOL_PEAK.findall(proc.stdout + proc.stderr)
    assert len(peaks) == 1, "no memory pool statistics from MindSpore"
    return {**result, "pool_peak": int(peaks[0]) << 20}


def measured_on_ranks(case: Case, env: dict[str, str]) -> dict[str, int]:
    """The probe on `case.model_parallel` msrun ranks; the largest rank's figures."""
    import tempfile

    from llama_core.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        launch(
            [json.dumps(asdict(case))],
            worker_num=case.model_parallel,
            local_worker_num=case.model_parallel,
            master_port=None,
            log_dir=Path(tmp),
            join=True,
            command=[sys.executable, __file__],
            env=env,
        )
        ranks = []
        for rank in range(case.model_parallel):
            log = (Path(tmp) / f"worker_{rank}.log").read_text()
            result = json.loads(next(x for x in log.splitlines() if x.startswith('{"parameters"')))
            peaks = set(POOL_PEAK.findall(log))  # a rank may print the same statistics twice
            assert len(peaks) == 1, f"rank {rank}: no memory pool statistics from MindSpore"
            ranks.append({**result, "pool_peak": int(peaks.pop()) << 20})
    return max(ranks, key=lambda r: r["parameters"] + r["pool_peak"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_plan_is_within_20_percent_of_a_measured_step(measured: dict, name: str) -> None:
    plan = memory_plan(CASES[name].config(), "CPU")
    step = measured[name]["parameters"] + measured[name]["pool_peak"]
    print(
        f"{name}: plan {plan.total_bytes_per_device / GIB:.3f} GiB ({plan.peak_phase}), measured "
        f"{step / GIB:.3f} GiB (pool {measured[name]['pool_peak'] / GIB:.3f}), process RSS growth "
        f"{measured[name]['rss_growth'] / GIB:.3f} GiB"
    )
    assert measured[name]["pool_peak"] > 2 * measured[name]["parameters"] > 0  # activations dominate
    assert 0.8 <= plan.total_bytes_per_device / step <= 1.2, (
        f"plan {plan.total_bytes_per_device:,} B vs {step:,} B"
    )


if __name__ == "__main__":
    print(json.dumps(measure(Case(**json.loads(sys.argv[1])))))
