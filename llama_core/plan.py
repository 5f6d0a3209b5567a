"""The memory plan of a fine-tune: bytes per device, term by term, before anything is downloaded.

`llama-lora plan --config CFG [--a.b.c VALUE ...]` (or `python -m llama_core.plan`) prints it as JSON:
each term with the formula it comes from, the total under `total_bytes_per_device`. `validate` runs
it for Ascend requests and refuses one over `context.max_device_memory`, naming the largest term
and the changes that would fit (`fixes`).

The terms follow this trainer's code (`llama_core.model`, `llama_core.train.step`), not MindFormers':
- base weights in `param_init_type`, Megatron-split over `model_parallel` (q/k/v, gate/up, o, down,
  embedding and head; norms replicated; a tied head is the embedding);
- trainable parameters (LoRA, or every weight without `pet_config`), their gradients, AdamW's two
  moments (`nn.AdamWeightDecay` clones the parameters: their dtype), the accumulation buffers;
- the compute-dtype weight copies the matmuls' input gradients read;
- the activations autodiff keeps for the backward pass, at `seq_length` x `batch_size`;
- under recompute, the recomputed layer; a layer backward's temporaries; the loss's chunk buffers;
- a framework reserve.
The total is the step's peak: the larger of the loss's backward (every kept activation and the
loss buffers) and a decoder layer's backward (the loss buffers freed, the layer's temporaries and,
under recompute, its recomputed activations); each term says whether it is alive then (`at_peak`).
The CPU figure is held within 20% of measured steps (tests/test_plan.py: MindSpore's memory pool
peak plus the parameters); the Ascend figure differs in the dropout masks (bits) and the reserve,
and is a derivation from the same code, not a measurement. No MindSpore import: validate stays fast.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llama_core.cli import exit_code
from llama_core.config import apply_overrides, layout_from_config, load_config, parse_override_args
from llama_core.errors import ConfigError
from llama_core.model.config import LlamaConfig
from llama_core.model.lora_config import LoraConfig
from llama_core.results import print_result

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# llama_core.model.llama.LOSS_CHUNK_TOKENS (that module imports MindSpore).
LOSS_CHUNK_TOKENS = 1024
# [chunk, vocab/mp] fp32 tensors alive at the loss's peak: bench.loss_memory measured 2074 MiB for
# chunks of [1024, 128256] (501 MiB each) with a frozen head, i.e. 4.1 of them.
LOSS_CHUNK_TENSORS = 4
# Ascend: inside max_device_memory, besides the tensors counted here: operator workspaces (matmul,
# flash attention), the communication operators' fused buffers, the memory pool's fragmentation.
# A judgement, not measured here (no NPU); HCCL's own buffers (HCCL_BUFFSIZE, 200 MB per
# communicator) and CANN sit in the 5 GB a 64 GB 910B keeps outside MindFormers' 59GB.
ASCEND_RESERVE_BYTES = 2 * GIB
# CPU: the memory pool's actual peak over the sum of its tensors (alignment, fragmentation): 33 MiB
# in a step of 1 layer at hidden 1024 (tests/test_plan.py measures the pool's peak).
CPU_RESERVE_BYTES = 32 << 20
# Dropout's mask per element: the CPU kernel returns it in the input's dtype, Ascend's
# DropoutGenMask one bit per element.
_MASK_BITS = {"CPU": None, "Ascend": 1}
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "lm_head")  # output rows split over model_parallel
ROW_PARALLEL = ("wo", "w2")  # input columns split
# model_parallel values tried by `fixes`: a tensor-parallel group stays inside one 8-NPU node
MODEL_PARALLEL_CHOICES = (2, 4, 8)


@dataclass(frozen=True)
class Term:
    """One part of a device's memory: its bytes, how they were counted, and whether it is alive at
    the step's peak (what the total sums)."""

    bytes: int
    why: str
    at_peak: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one fine-tune request, term by term; the total is the step's peak, the
    sum of the terms alive at it. `fits` is None without a limit."""

    device_target: str
    model_parallel: int
    batch_size: int
    seq_length: int
    recompute: bool
    select_recompute: bool
    peak_phase: str  # when in the step the total is reached
    terms: dict[str, Term]
    total_bytes_per_device: int  # the terms at_peak
    total_gib: float
    largest_term: str
    max_device_memory: str
    max_device_memory_bytes: int | None
    fits: bool | None


@dataclass(frozen=True)
class _Run:
    """What the plan reads from a run config besides the model."""

    model: LlamaConfig
    device_target: str
    mp: int
    batch: int
    accumulation: int
    recompute: bool
    select_recompute: bool
    lora: dict[str, Any] | None  # pet_config with defaults; None: every weight is trained


def parse_memory(text: str) -> int | None:
    """MindSpore's `max_device_memory` ('59GB', '58.5GB'; GB = 2**30 bytes) in bytes; None when empty."""
    if text in ("", None):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*GB\s*", str(text))
    if not match:
        raise ConfigError(f"context.max_device_memory {text!r} is not a size like '59GB'")
    return int(float(match.group(1)) * GIB)


def _flag(cfg: Mapping[str, Any], key: str) -> bool:
    value = (cfg.get("recompute_config") or {}).get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(
            f"recompute_config.{key} must be True or False (MindFormers' per-stage lists need pipeline "
            f"stages), got {value!r}"
        )
    return value


def _positive(cfg: Mapping[str, Any], key: str) -> int:
    value = (cfg.get("runner_config") or {}).get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config key 'runner_config.{key}' must be a positive integer, got {value!r}")
    return value


def _read_run(cfg: Mapping[str, Any], device_target: str | None) -> _Run:
    model = LlamaConfig.from_run_config(cfg)
    context = cfg.get("context") or {}
    device = device_target or context.get("device_target") or "CPU"
    if device not in _MASK_BITS:
        raise ConfigError(f"the memory plan knows CPU and Ascend devices, not {device!r}")
    pet = (cfg.get("model") or {}).get("model_config", {}).get("pet_config")
    lora = None
    if pet:  # with LoRA's defaults, and a list of target_modules as one regex
        lc = LoraConfig.from_pet_config(pet)
        lora = {"lora_rank": lc.rank, "lora_dropout": lc.dropout, "target_modules": lc.target_modules}
    return _Run(
        model=model,
        device_target=device,
        mp=layout_from_config(cfg).mp,
        batch=_positive(cfg, "batch_size"),
        accumulation=_positive(cfg, "gradient_accumulation_steps"),
        recompute=_flag(cfg, "recompute"),
        select_recompute=_flag(cfg, "select_recompute"),
        lora=lora,
    )


def indivisible(model: LlamaConfig, mp: int) -> list[str]:
    """The model sizes model_parallel `mp` does not split (heads, FFN, vocabulary; kv heads must
    divide by it or divide it), as validate refuses them."""
    sizes = {"num_heads": model.num_heads, "FFN width": model.ffn_hidden_size, "vocab_size": model.vocab_size}
    problems = [f"{name} {size}" for name, size in sizes.items() if size % mp]
    kv = model.num_kv_heads
    if kv % mp and mp % kv:
        problems.append(f"n_kv_heads {kv}")
    return problems


def _kv_split(model: LlamaConfig, mp: int) -> bool:
    """Whether k/v are split over the ranks: with fewer kv heads than ranks each rank computes them
    whole (and keeps the one kv head its query heads read)."""
    return model.num_kv_heads % mp == 0


def _split(model: LlamaConfig, name: str, mp: int) -> str | None:
    """How a Linear is split over model_parallel: "out", "in" or None (whole on every rank)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("wk", "wv") and not _kv_split(model, mp):
        return None
    return "out" if leaf in COLUMN_PARALLEL else "in" if leaf in ROW_PARALLEL else None


def _local_linears(model: LlamaConfig, mp: int) -> Iterator[tuple[str, int, int]]:
    """(name, out, in) of every Linear as one rank holds it."""
    for name, (out, inp) in model.linear_shapes().items():
        split = _split(model, name, mp)
        yield name, out // mp if split == "out" else out, inp // mp if split == "in" else inp


def base_elements(model: LlamaConfig, mp: int) -> int:
    """Parameters one rank holds: Linears and the embedding split, norms replicated."""
    linears = sum(out * inp for _, out, inp in _local_linears(model, mp))
    embedding = model.vocab_size // mp * model.hidden_size
    norms = (2 * model.num_layers + 1) * model.hidden_size
    per_layer = 2 * model.head_dim if model.qk_norm else 0
    if model.qkv_has_bias:  # split with their rows (k/v whole when their heads are)
        kv = model.num_kv_heads // mp if _kv_split(model, mp) else model.num_kv_heads
        per_layer += (model.num_heads // mp + 2 * kv) * model.head_dim
    return linears + embedding + norms + model.num_layers * per_layer


def lora_elements(model: LlamaConfig, lora: Mapping[str, Any], mp: int) -> int:
    """LoRA parameters one rank holds: a column-split layer's A [r, in] whole and B [out/mp, r];
    a row-split layer's A [r, in/mp] and B [out, r] whole."""
    pattern, rank = re.compile(lora["target_modules"]), lora["lora_rank"]
    return sum(rank * (out + inp) for name, out, inp in _local_linears(model, mp) if pattern.match(name))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _layer_activations(run: _Run, layer: int, pattern: re.Pattern[str] | None) -> tuple[int, str]:
    """Bytes autodiff keeps for one decoder layer's backward, and the formula.

    `select_recompute` changes nothing here: the cells it recomputes (the attention probabilities,
    the FFN's silu) hand their outputs to matmuls whose backward reads them, so those outputs stay,
    and MindSpore 2.10 keeps the log-softmax inside too (measured on CPU: 1500 MiB against 1536
    without it, tests/test_plan.py's select_recompute case)."""
    m, mp = run.model, run.mp
    t, s, b = run.batch * m.seq_length, m.seq_length, run.batch
    cb, nb, sb = (DTYPE_BYTES[x] for x in (m.compute_dtype, m.layernorm_compute_type, m.softmax_compute_type))
    h, d, n = m.hidden_size, m.head_dim, m.num_heads // mp
    # fewer kv heads than ranks: each rank keeps the one kv head its query heads read
    q, kv, f = n * d, (m.num_kv_heads // mp if _kv_split(m, mp) else 1) * d, m.ffn_hidden_size // mp
    parts = {"norm inputs 2*t*h*nb": 2 * t * h * nb}
    if m.qk_norm:
        parts["q/k norm inputs t*(q+kv)*nb"] = t * (q + kv) * nb
    if m.use_flash_attention:  # the fused kernel keeps q, k, v, its output and [b, n, s, 8] fp32 max/sum
        parts["flash q,k,v,out t*(2q+2kv)*cb + stats"] = t * (2 * q + 2 * kv) * cb + 2 * b * n * s * 8 * 4
    else:  # k and v after the GQA repeat, as the score and weighted-sum matmuls read them
        parts["q,k,v t*3q*cb"] = 3 * t * q * cb
        cast = b * n * s * s * cb if sb != cb else 0
        parts["log-softmax, probs 2*b*n*s^2*sb (+cast)"] = 2 * b * n * s * s * sb + cast
    parts["FFN gate, silu, up 3*t*f*cb"] = 3 * t * f * cb
    if pattern is not None:
        parts["LoRA inputs"] = _lora_inputs(run, layer, pattern)
    total = sum(parts.values())
    return total, " + ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)


def _kept_scores(run: _Run) -> int:
    """The [b, n, s, s] tensor a recomputed eager attention still keeps per layer: MindSpore 2.10
    does not recompute the model's exp(log_softmax(scores)) (measured on CPU: with ops.softmax
    instead nothing of that size stays); none with flash attention."""
    m = run.model
    if m.use_flash_attention:
        return 0
    return run.batch * m.num_heads // run.mp * m.seq_length**2 * DTYPE_BYTES[m.softmax_compute_type]


def _lora_inputs(run: _Run, layer: int, pattern: re.Pattern[str]) -> int:
    """What LoRA's A and B gradients read in one layer: each target's dropout output and mask (or,
    without dropout, the distinct inputs), and its [t, r] `down`."""
    m, mp, lora = run.model, run.mp, run.lora or {}
    t, cb = run.batch * m.seq_length, DTYPE_BYTES[m.compute_dtype]
    width = {
        "attention.wq": m.hidden_size, "attention.wk": m.hidden_size, "attention.wv": m.hidden_size,
        "attention.wo": m.num_heads * m.head_dim // mp, "feed_forward.w1": m.hidden_size,
        "feed_forward.w3": m.hidden_size, "feed_forward.w2": m.ffn_hidden_size // mp,
    }  # fmt: skip
    # the input wq/wk/wv share (attention norm), the one w1/w3 share (FFN norm)
    shared = {"attention.wq": "a", "attention.wk": "a", "attention.wv": "a", "feed_forward.w1": "f"}
    shared["feed_forward.w3"] = "f"
    targets = [key for key in width if pattern.match(f"model.layers.{layer}.{key}")]
    down = len(targets) * t * lora["lora_rank"] * cb
    if lora["lora_dropout"] > 0:
        bits = _MASK_BITS[run.device_target]
        mask = cb if bits is None else bits / 8
        return down + int(sum(t * width[key] * (cb + mask) for key in targets))
    distinct = {shared.get(key, key): width[key] for key in targets}
    return down + sum(t * w * cb for w in distinct.values())


def _layers(run: _Run) -> tuple[list[int], str]:
    """Each decoder layer's kept activations, and the formula of the largest."""
    pattern = re.compile(run.lora["target_modules"]) if run.lora else None
    layers = [_layer_activations(run, i, pattern) for i in range(run.model.num_layers)]
    return [size for size, _ in layers], max(layers)[1]


def _backward_temporaries(run: _Run) -> Term:
    """A layer's backward holds a couple of gradients of its largest activations at once: of the
    probabilities and log-softmax ([b, n, s, s]) with eager attention, else of gate and up ([t, f])."""
    m = run.model
    b, s, n = run.batch, m.seq_length, m.num_heads // run.mp
    if not m.use_flash_attention:
        sb = DTYPE_BYTES[m.softmax_compute_type]
        return Term(2 * b * n * s * s * sb, f"2 score gradients 2*b*n*s^2*sb, b {b}, n {n}, s {s}")
    t, f, cb = b * s, m.ffn_hidden_size // run.mp, DTYPE_BYTES[m.compute_dtype]
    return Term(2 * t * f * cb, f"2 FFN gradients 2*t*f*cb, t {t}, f {f}")


def _phases(run: _Run, pb: int, cb: int) -> tuple[str, dict[str, Term]]:
    """The terms of the step's two candidate peaks, and which one is the peak.

    - the loss's backward, the first thing backward runs: every kept activation, the loss's chunk
      buffers, the weight copies the backward will read;
    - a decoder layer's backward, the loss buffers freed: the kept activations, under recompute
      the layer's recomputed ones, its backward's temporaries.
    """
    m = run.model
    t, h = run.batch * m.seq_length, m.hidden_size
    nb = DTYPE_BYTES[m.layernorm_compute_type]
    sizes, formula = _layers(run)
    outside = t * h * (nb + cb)  # the final norm's input, and its output the loss's bprop keeps
    shape = f"t = batch {run.batch} x seq {m.seq_length} = {t} tokens"
    if run.recompute:
        kept = m.num_layers * (t * h * cb + _kept_scores(run))
        activations = Term(
            kept + outside,
            f"recompute: each layer's input t*h*cb and the probabilities its exp(log_softmax) keeps "
            f"b*n*s^2*sb (eager attention) x L {_gib(kept)} + final norm in/out t*h*(nb+cb) "
            f"{_gib(outside)}; {shape}",
        )
        recomputed = Term(
            max(sizes) - _kept_scores(run),
            f"one layer's activations, recomputed for its backward ({formula}), less the probabilities "
            "kept (above)",
        )
    else:
        activations = Term(
            sum(sizes) + outside,
            f"per layer ({formula}) x {m.num_layers} layers + final norm in/out t*h*(nb+cb) "
            f"{_gib(outside)}; {shape}, heads, FFN and q/kv widths / model_parallel {run.mp}",
        )
        recomputed = Term(0, "recompute off: every layer's activations are kept (above)")
    copies_loss, copies_layer = _compute_copies(run, pb, cb)
    temporaries = _backward_temporaries(run)
    loss = _loss(run)
    at_loss = activations.bytes + loss.bytes + copies_loss.bytes
    at_layer = activations.bytes + recomputed.bytes + temporaries.bytes + copies_layer.bytes
    if at_loss >= at_layer:
        phase, copies, idle = "the loss's backward", copies_loss, ("recomputed_layer", "backward_temporaries")
    else:
        phase, copies, idle = "a decoder layer's backward", copies_layer, ("loss_buffers",)
    terms = {
        "weight_compute_copies": copies,
        "activations": activations,
        "recomputed_layer": recomputed,
        "backward_temporaries": temporaries,
        "loss_buffers": loss,
    }
    for name in idle:
        terms[name] = replace(terms[name], at_peak=False)
    return phase, terms


def _terms(run: _Run) -> tuple[str, dict[str, Term]]:
    m, mp = run.model, run.mp
    pb, cb = DTYPE_BYTES[m.param_init_type], DTYPE_BYTES[m.compute_dtype]
    base = base_elements(m, mp)
    if run.lora:
        trainable = lora_elements(m, run.lora, mp)
        what = f"LoRA rank {run.lora['lora_rank']} on {run.lora['target_modules']!r}"
    else:
        trainable, what = base, "every weight (no pet_config)"
    terms = {
        "base_weights": Term(
            base * pb,
            f"{base:,} parameters per device x {pb} bytes ({m.param_init_type}): Linears and the embedding "
            f"split over model_parallel {mp}, norms replicated",
        ),
        "trainable_parameters": Term(
            trainable * pb if run.lora else 0,
            f"{trainable:,} trainable parameters per device ({what}) x {pb} bytes"
            + ("" if run.lora else "; they are the base weights"),
        ),
        "gradients": Term(trainable * pb, f"one gradient per trainable parameter, {pb} bytes each"),
        "optimizer_state": Term(
            2 * trainable * pb,
            f"AdamW's two moments per trainable parameter, in its dtype ({pb} bytes: AdamWeightDecay "
            "clones the parameters)",
        ),
        "gradient_accumulation": Term(
            trainable * pb if run.accumulation > 1 else 0,
            f"gradient_accumulation_steps {run.accumulation}: "
            + ("one accumulation buffer per trainable parameter" if run.accumulation > 1 else "no buffer"),
        ),
    }
    phase, step_terms = _phases(run, pb, cb)
    terms.update(step_terms)
    if run.device_target == "Ascend":
        reserve = Term(
            ASCEND_RESERVE_BYTES,
            "Ascend: operator workspaces, communication buffers and pool fragmentation inside "
            "max_device_memory (a judgement; HCCL's own buffers and CANN use the memory outside it)",
        )
    else:
        reserve = Term(
            CPU_RESERVE_BYTES,
            "CPU: the memory pool's alignment and fragmentation (its actual peak over the tensors' "
            "sum, measured in tests/test_plan.py's steps)",
        )
    terms["framework_reserve"] = reserve
    return phase, terms


def _compute_copies(run: _Run, pb: int, cb: int) -> tuple[Term, Term]:
    """The compute-dtype weight copies alive in the loss's backward and in a layer's backward.

    Linear.project multiplies `weight.astype(compute_dtype)`; the matmul's input gradient reads that
    copy, so autodiff keeps it until the layer's backward (under recompute only the recomputed
    layer's exists). The head's copy is an input of the loss's custom bprop, freed after it."""
    m = run.model
    if pb == cb:
        none = Term(0, f"param_init_type {m.param_init_type} is the compute dtype: no copies")
        return none, none
    per_layer = [0] * m.num_layers
    head = 0
    for name, out, inp in _local_linears(m, run.mp):
        if name == "lm_head":
            head = out * inp
        else:
            per_layer[int(name.split(".")[2])] += out * inp
    if m.tie_word_embeddings:
        head = m.vocab_size // run.mp * m.hidden_size
    what = f"{m.compute_dtype} copies ({cb} bytes) of the frozen weights the matmul gradients read"
    if run.recompute:
        return (
            Term(head * cb, f"{what}: the output head's"),
            Term(max(per_layer) * cb, f"{what}: the recomputed layer's"),
        )
    return (
        Term((sum(per_layer) + head) * cb, f"{what}: every layer's and the output head's"),
        Term(sum(per_layer) * cb, f"{what}: every layer's"),
    )


def _loss(run: _Run) -> Term:
    m = run.model
    t = run.batch * m.seq_length
    chunk, vocab = min(LOSS_CHUNK_TOKENS, t), m.vocab_size // run.mp
    size = LOSS_CHUNK_TENSORS * chunk * vocab * 4 + t * 8
    return Term(
        size,
        f"{LOSS_CHUNK_TENSORS} fp32 [{chunk}, {vocab}] logits/softmax/gradient chunks (the loss runs "
        f"{LOSS_CHUNK_TOKENS} tokens at a time over vocab/model_parallel) + targets and mask 8*t",
    )


def _plan(run: _Run, max_device_memory: str) -> MemoryPlan:
    problems = indivisible(run.model, run.mp)
    if problems:
        raise ConfigError(
            f"parallel_config.model_parallel {run.mp} does not divide the model's {', '.join(problems)}"
        )
    phase, terms = _terms(run)
    total = _sum(terms)
    limit = parse_memory(max_device_memory)
    return MemoryPlan(
        device_target=run.device_target,
        model_parallel=run.mp,
        batch_size=run.batch,
        seq_length=run.model.seq_length,
        recompute=run.recompute,
        select_recompute=run.select_recompute,
        peak_phase=phase,
        terms=terms,
        total_bytes_per_device=total,
        total_gib=round(total / GIB, 2),
        largest_term=max(terms, key=lambda k: terms[k].bytes if terms[k].at_peak else -1),
        max_device_memory=max_device_memory or "",
        max_device_memory_bytes=limit,
        fits=None if limit is None else total <= limit,
    )


def memory_plan(cfg: Mapping[str, Any], device_target: str | None = None) -> MemoryPlan:
    """The plan of a run config (overrides applied) on `device_target` (default: its context's)."""
    run = _read_run(cfg, device_target)
    return _plan(run, str((cfg.get("context") or {}).get("max_device_memory") or ""))


def fixes(cfg: Mapping[str, Any], device_target: str | None = None) -> list[str]:
    """Changes that bring the plan under max_device_memory, each with its total: the smallest
    model_parallel that divides the model and fits, recompute, the largest batch size that fits;
    when none fits alone, the least combined change that does."""
    run = _read_run(cfg, device_target)
    limit = parse_memory(str((cfg.get("context") or {}).get("max_device_memory") or ""))
    if limit is None:
        return []
    mps = [mp for mp in MODEL_PARALLEL_CHOICES if mp > run.mp and not indivisible(run.model, mp)]
    single = {
        "model_parallel": [replace(run, mp=mp) for mp in mps],
        "recompute": [replace(run, recompute=True)] if not run.recompute else [],
        "batch": [replace(run, batch=b) for b in range(run.batch - 1, 0, -1)],
    }
    found = [_describe(run, fit) for fit in (_first_fit(c, limit) for c in single.values()) if fit]
    if found:
        return found
    combined = [
        replace(run, mp=mp, recompute=recompute, batch=batch)
        for mp in [run.mp, *mps]
        for recompute in sorted({run.recompute, True})
        for batch in range(run.batch, 0, -1)
    ]
    fit = _first_fit(combined, limit)
    return [_describe(run, fit)] if fit else []


def _sum(terms: Mapping[str, Term]) -> int:
    """The step's peak: the terms alive at it."""
    return sum(term.bytes for term in terms.values() if term.at_peak)


def _total(run: _Run) -> int:
    return _sum(_terms(run)[1])


def _first_fit(runs: list[_Run], limit: int) -> _Run | None:
    return next((run for run in runs if _total(run) <= limit), None)


def _describe(run: _Run, fit: _Run) -> str:
    """The config keys `fit` changes from `run`, with its total."""
    changes = {
        "parallel_config.model_parallel": (run.mp, fit.mp),
        "recompute_config.recompute": (run.recompute, fit.recompute),
        "runner_config.batch_size": (run.batch, fit.batch),
    }
    keys = " + ".join(f"{key} {new}" for key, (old, new) in changes.items() if old != new)
    return f"{keys} ({_gib(_total(fit))})"


def check_fits(cfg: Mapping[str, Any], device_target: str) -> MemoryPlan:
    """The plan; ConfigError when its total exceeds max_device_memory, naming the largest term and
    what would fit."""
    plan = memory_plan(cfg, device_target)
    if plan.fits is not False:
        return plan
    largest = plan.terms[plan.largest_term]
    found = fixes(cfg, device_target)
    remedy = (
        "; would fit: " + ", ".join(found)
        if found
        else "; nothing tried fits (model_parallel up to 8, recompute, batch 1)"
    )
    raise ConfigError(
        f"the memory plan needs {_gib(plan.total_bytes_per_device)} per {device_target} device, over "
        f"context.max_device_memory {plan.max_device_memory}; largest term: {plan.largest_term} "
        f"{_gib(largest.bytes)} ({largest.why}){remedy}"
    )


class _Parser(argparse.ArgumentParser):
    """Keeps the words it does not know (`--a.b.c value` config overrides) as `args.overrides`."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, rest = self.parse_known_args(args, namespace)
        parsed.overrides = rest
        return parsed


def build_parser(prog: str = "python -m llama_core.plan") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="The memory plan of a fine-tune config: bytes per device, term by term (JSON).",
        epilog="Extra --a.b.c value arguments override config keys, e.g. --parallel_config.model_parallel 8 "
        "--context.device_target Ascend.",
    )
    parser.add_argument("--config", required=True, help="run config YAML")
    return parser


def stage_from_args(args: argparse.Namespace) -> MemoryPlan:
    """The plan of the parsed command line's config, its overrides applied."""
    return memory_plan(apply_overrides(load_config(args.config), parse_override_args(args.overrides)))


def main(argv: Sequence[str] | None = None) -> int:
    print_result(stage_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
