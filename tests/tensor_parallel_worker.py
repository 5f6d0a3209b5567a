"""One msrun rank of tests/test_tensor_parallel.py's model check (not a test module itself).

`python tests/tensor_parallel_worker.py CASES_JSON`, on model_parallel ranks. For each case
({"config": model_config, "full": ckpt, "shards": dir, "out": dir}) it builds the whole model
(model_parallel 1, in this process, no communication) from the complete checkpoint and this rank's
tensor-parallel slices from the shard stage's folder, then writes OUT/rank_<i>.npz with both
models' logits, losses and LoRA gradients (the whole model's gradients cut to this rank's slice,
as the shard manifest says), and the bytes of the base weights this rank holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.communication import get_group_size, get_rank, init

from llama_core.checkpoint.layout import read_shard_manifest
from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora
from llama_core.model.lora import is_lora_parameter
from llama_core.model.parallel import TensorParallel
from llama_core.model.weights import load_weights


def build(config: dict, tp: TensorParallel, ckpt: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_dict(config), tp)
    apply_lora(model, LoraConfig.from_pet_config(config["pet_config"]))
    load_weights(model, ckpt)
    return model


def check_case(config: dict, full_ckpt: str, shard_dir: str, out_dir: str, tp: TensorParallel) -> None:
    rank = tp.index
    whole = build(config, TensorParallel(), Path(full_ckpt))
    split = build(config, tp, Path(shard_dir) / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")

    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(3, config["vocab_size"], (2, 17)).astype(np.int32))
    labels_np = ids.asnumpy().copy()
    labels_np[:, :5] = -100
    labels = ms.Tensor(labels_np)
    out: dict[str, np.ndarray] = {}
    for tag, model in (("whole", whole), ("split", split)):
        model.set_train(False)
        out[f"{tag}_logits"] = model(ids[:, :-1]).asnumpy()
        params = [p for p in model.trainable_params() if is_lora_parameter(p.name)]
        loss, grads = ops.value_and_grad(model, None, params)(ids, labels)
        out[f"{tag}_loss"] = loss.asnumpy()
        for p, g in zip(params, grads, strict=True):
            out[f"{tag}_grad/{p.name}"] = g.asnumpy()
    # the whole model's gradient of each LoRA tensor, cut as the shard stage cut its weight
    manifest = read_shard_manifest(Path(shard_dir))
    for t in manifest["tensors"]:
        key = f"whole_grad/{t['name']}"
        if key in out and t["axis"] is not None:
            lo, hi = t["slices"][rank]
            out[key] = np.take(out[key], range(lo, hi), axis=t["axis"])
    out["base_bytes"] = np.array(
        sum(p.asnumpy().nbytes for p in split.get_parameters() if not is_lora_parameter(p.name))
    )
    np.savez(Path(out_dir) / f"rank_{rank}.npz", **out)


def main(cases_json: str) -> None:
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.communication.create_group("tp_test", list(range(get_group_size())))
    tp = TensorParallel(size=get_group_size(), index=get_rank(), group="tp_test")
    for case in json.loads(Path(cases_json).read_text()):
        check_case(case["config"], case["full"], case["shards"], case["out"], tp)


if __name__ == "__main__":
    main(*sys.argv[1:])
