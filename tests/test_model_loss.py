"""Chunked cross-entropy: the model's masked mean loss and its gradients, chunk by chunk."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig
from llama_core.model.llama import Linear
from llama_core.model.lora import LoraLinear
from llama_core.model.loss import ChunkedCrossEntropy

ms.set_context(mode=ms.GRAPH_MODE)

BATCH, SEQ, HIDDEN, VOCAB = 2, 13, 16, 50  # 26 tokens


def config(**overrides: object) -> LlamaConfig:
    sizes = {"seq_length": SEQ, "hidden_size": HIDDEN, "num_layers": 1, "num_heads": 2, "vocab_size": VOCAB}
    return LlamaConfig(**{**sizes, "multiple_of": 16, **overrides})


def make_head(lora: bool, compute_dtype: str = "float32") -> nn.Cell:
    cfg = config(compute_dtype=compute_dtype)
    head = Linear(HIDDEN, VOCAB, cfg)
    if lora:
        head = LoraLinear(head, LoraConfig(rank=4, alpha=8, dropout=0.1), cfg)
        # B starts at zero; a non-zero B makes the adapter's path count in the loss and the gradients
        b = np.random.default_rng(7).normal(0, 0.1, head.mindpet_delta_lora_b.shape).astype(np.float32)
        head.mindpet_delta_lora_b.set_data(ms.Tensor(b))
    head.set_train(False)  # LoRA dropout off: both paths see the same adapter input
    return head


def batch(dtype: ms.dtype = ms.float32) -> tuple[ms.Tensor, ms.Tensor, ms.Tensor]:
    """hidden [BATCH, SEQ, HIDDEN], targets with ignored (-100) ones, their float mask (also padding)."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(BATCH, SEQ, HIDDEN)).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    targets[0, :4] = -100  # a prompt
    targets[1, 9] = -100
    mask = targets != -100
    mask[1, 11:] = False  # padding: a real target id, masked all the same
    return ms.Tensor(hidden, dtype), ms.Tensor(targets), ms.Tensor(mask.astype(np.float32))


class Unchunked(nn.Cell):
    """LlamaForCausalLM's loss: fp32 logits of the whole batch, log-softmax, gather, masked mean."""

    def __init__(self, head: nn.Cell) -> None:
        super().__init__()
        self.head = head

    def construct(self, hidden: ms.Tensor, targets: ms.Tensor, mask: ms.Tensor) -> ms.Tensor:
        logits = self.head(hidden).astype(ms.float32)
        safe = ops.where(mask > 0, targets, ops.zeros_like(targets))
        nll = -ops.gather_elements(ops.log_softmax(logits, -1), -1, safe.expand_dims(-1)).squeeze(-1)
        return ops.sum(nll * mask) / (ops.sum(mask) + 1e-8)


class Chunked(nn.Cell):
    def __init__(self, head: nn.Cell, chunk_tokens: int) -> None:
        super().__init__()
        self.head = head
        self.loss = ChunkedCrossEntropy(chunk_tokens)

    def construct(self, hidden: ms.Tensor, targets: ms.Tensor, mask: ms.Tensor) -> ms.Tensor:
        return self.loss(hidden, self.head, targets, mask)


def loss_and_grads(net: nn.Cell, head: nn.Cell, dtype: ms.dtype = ms.float32) -> dict[str, np.ndarray]:
    """The loss and its gradients w.r.t. the hidden states and every head parameter, as float64."""
    params = head.trainable_params()
    loss, (d_hidden, d_params) = ops.value_and_grad(net, 0, params)(*batch(dtype))
    out = {
        "loss": loss,
        "hidden": d_hidden,
        **{p.name.rpartition(".")[2]: g for p, g in zip(params, d_params, strict=True)},
    }
    return {k: v.astype(ms.float32).asnumpy().astype(np.float64) for k, v in out.items()}


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float) -> None:
    """Each array within `tol` of the reference, relative to the reference's largest magnitude."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert np.abs(expected).max() > 0, name  # a zero gradient would prove nothing
        error = np.abs(got[name] - expected).max() / np.abs(expected).max()
        assert error <= tol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("lora", [False, True], ids=["linear", "lora"])
@pytest.mark.parametrize("chunk_tokens", [13, 8, 64], ids=["divides", "remainder", "one-chunk"])
def test_chunked_matches_unchunked_loss_and_gradients(lora: bool, chunk_tokens: int) -> None:
    head = make_head(lora)
    want = loss_and_grads(Unchunked(head), head)
    got = loss_and_grads(Chunked(head, chunk_tokens), head)
    expected_keys = {"loss", "hidden", "weight"} | (
        {"mindpet_delta_lora_a", "mindpet_delta_lora_b"} if lora else set()
    )
    assert set(want) == expected_keys
    assert_matches(got, want, 1e-6)


def test_masked_tokens_carry_no_loss_and_no_gradient() -> None:
    head = make_head(lora=False)
    hidden, targets, mask = batch()
    masked = mask.asnumpy() == 0
    # other targets and hidden states at the masked positions change nothing
    hidden2 = hidden.asnumpy().copy()
    hidden2[masked] = 5.0
    targets2 = np.where(masked, -7, targets.asnumpy()).astype(np.int32)
    net = Chunked(head, 8)
    grad_fn = ops.value_and_grad(net, 0)
    loss, d_hidden = grad_fn(hidden, targets, mask)
    loss2, d_hidden2 = grad_fn(ms.Tensor(hidden2), ms.Tensor(targets2), mask)
    assert float(loss.asnumpy()) == pytest.approx(float(loss2.asnumpy()), rel=1e-6)
    assert np.all(d_hidden.asnumpy()[masked] == 0) and np.all(d_hidden2.asnumpy()[masked] == 0)


def test_half_precision_compute_matches_unchunked() -> None:
    # float16 stands for bfloat16 here: the CPU backend has no bfloat16 MatMul; the dtype handling is shared
    head = make_head(lora=True, compute_dtype="float16")
    want = loss_and_grads(Unchunked(head), head, ms.float16)
    got = loss_and_grads(Chunked(head, 8), head, ms.float16)
    assert_matches(got, want, 5e-3)


def test_pynative_mode_matches_graph_mode() -> None:
    head = make_head(lora=True)
    graph = loss_and_grads(Chunked(head, 8), head)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        pynative = loss_and_grads(Chunked(head, 8), head)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert_matches(pynative, graph, 1e-6)


def test_equals_the_models_own_loss() -> None:
    """On the model's final hidden states and its lm_head, the loss LlamaForCausalLM returns."""
    model = LlamaForCausalLM(config())
    model.set_train(False)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    ids[0, 10:] = config().pad_token_id
    labels = ids.copy()
    labels[:, :4] = -100
    expected = float(model(ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    inputs, targets = ids[:, :-1], labels[:, 1:]
    mask = ((inputs != config().pad_token_id) & (targets != -100)).astype(np.float32)
    hidden = model.model(ms.Tensor(inputs))
    got = Chunked(model.lm_head, 5)(hidden, ms.Tensor(targets), ms.Tensor(mask))
    assert float(got.asnumpy()) == pytest.approx(expected, rel=1e-6)


def test_chunk_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        ChunkedCrossEntropy(0)
