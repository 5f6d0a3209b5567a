"""The demo's base model: its tiny random Llama briefly pre-trained, in numpy, on generated text.

A random base answers in noise, so a before/after comparison shows nothing a reader can judge. A few
dozen full-weight steps on the demo's generic instructions (never its facts) give a base that writes
the chat format's words; LoRA fine-tuning then has something to teach. numpy keeps it in-process, in
seconds and deterministic, with nothing to compile and no framework context set in the caller.

The model is Hugging Face's `LlamaForCausalLM` (weights under its names, rotate-half RoPE, RMSNorm,
SwiGLU, no biases, untied head); tests/test_demo_inputs.py holds the forward pass to transformers'.
Sequences are right-padded: attention is causal, so padding changes no earlier position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, tuple]:
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * w, (x * r, r, w)


def _rms_norm_back(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
    xhat, r, w = cache
    dxhat = dy * w
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)


def _rotate_half(x: np.ndarray, sign: int = 1) -> np.ndarray:
    """HF's rotate_half (sign 1) and its transpose (sign -1), which the backward pass applies."""
    half = x.shape[-1] // 2
    return np.concatenate([-sign * x[..., half:], sign * x[..., :half]], axis=-1)


def _rope(seq: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class TinyLlama:
    """Forward and backward passes of a Llama in HF layout, for small shapes (batch, sequence)."""

    def __init__(self, shape: dict[str, Any]) -> None:
        self.layers = int(shape["num_hidden_layers"])
        self.heads = int(shape["num_attention_heads"])
        if int(shape["num_key_value_heads"]) != self.heads:
            raise ValueError("grouped-query attention is not supported here")
        self.head_dim = int(shape["hidden_size"]) // self.heads
        self.eps, self.theta = float(shape["rms_norm_eps"]), float(shape["rope_theta"])

    def logits(self, w: Weights, ids: np.ndarray) -> np.ndarray:
        """Logits (batch, seq, vocab) of token ids (batch, seq)."""
        hn = self._forward(w, ids)[0]
        return hn @ w["lm_head.weight"].T

    def loss_and_grads(self, w: Weights, ids: np.ndarray, mask: np.ndarray) -> tuple[float, Weights]:
        """Mean cross-entropy of predicting `ids[:, t + 1]` at each position t where `mask[:, t]`, and
        its gradient for every weight (the head computed at those positions only)."""
        hn, caches = self._forward(w, ids)
        where = np.nonzero(mask)
        logits = hn[where] @ w["lm_head.weight"].T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        rows, targets = np.arange(len(p)), ids[where[0], where[1] + 1]
        loss = float(-np.log(p[rows, targets] + 1e-30).mean())
        p[rows, targets] -= 1.0
        dlogits = p / len(p)
        grads = {"lm_head.weight": dlogits.T @ hn[where]}
        dhn = np.zeros_like(hn)
        dhn[where] = dlogits @ w["lm_head.weight"]
        return loss, self._backward(w, ids, dhn, caches, grads)

    def _forward(self, w: Weights, ids: np.ndarray) -> tuple[np.ndarray, list]:
        batch, seq = ids.shape
        cos, sin = _rope(seq, self.head_dim, self.theta)
        causal = np.triu(np.full((seq, seq), -np.inf, np.float32), 1)
        h = w["model.embed_tokens.weight"][ids]
        caches = []
        for i in range(self.layers):
            p = f"model.layers.{i}."
            n1, c1 = _rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
            q, k, v = (self._heads(n1 @ w[p + f"self_attn.{x}_proj.weight"].T) for x in "qkv")
            qr, kr = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            s = qr @ kr.transpose(0, 1, 3, 2) / np.sqrt(self.head_dim) + causal
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
            h2 = h + o @ w[p + "self_attn.o_proj.weight"].T
            n2, c2 = _rms_norm(h2, w[p + "post_attention_layernorm.weight"], self.eps)
            g, u = n2 @ w[p + "mlp.gate_proj.weight"].T, n2 @ w[p + "mlp.up_proj.weight"].T
            sig = 1.0 / (1.0 + np.exp(-g))
            m = g * sig * u
            h = h2 + m @ w[p + "mlp.down_proj.weight"].T
            caches.append((c1, n1, qr, kr, v, a, o, c2, n2, g, sig, u, m))
        hn, cn = _rms_norm(h, w["model.norm.weight"], self.eps)
        caches.append((cn, cos, sin))
        return hn, caches

    def _backward(
        self, w: Weights, ids: np.ndarray, dhn: np.ndarray, caches: list, grads: Weights
    ) -> Weights:
        cn, cos, sin = caches[-1]
        dh, grads["model.norm.weight"] = _rms_norm_back(dhn, cn)
        for i in reversed(range(self.layers)):
            p = f"model.layers.{i}."
            c1, n1, qr, kr, v, a, o, c2, n2, g, sig, u, m = caches[i]
            # the MLP: h = h2 + down(silu(gate(n2)) * up(n2))
            grads[p + "mlp.down_proj.weight"] = _outer(dh, m)
            dm = dh @ w[p + "mlp.down_proj.weight"]
            dg = dm * u * sig * (1.0 + g * (1.0 - sig))
            du = dm * g * sig
            grads[p + "mlp.gate_proj.weight"], grads[p + "mlp.up_proj.weight"] = (
                _outer(dg, n2),
                _outer(du, n2),
            )
            dn2 = dg @ w[p + "mlp.gate_proj.weight"] + du @ w[p + "mlp.up_proj.weight"]
            dx, grads[p + "post_attention_layernorm.weight"] = _rms_norm_back(dn2, c2)
            dh = dh + dx  # dh2
            # attention: h2 = h + o_proj(softmax(rope(q) rope(k)^T / sqrt(d) + causal) v)
            grads[p + "self_attn.o_proj.weight"] = _outer(dh, o)
            do = self._heads(dh @ w[p + "self_attn.o_proj.weight"])
            dv = a.transpose(0, 1, 3, 2) @ do
            da = do @ v.transpose(0, 1, 3, 2)
            ds = a * (da - (da * a).sum(-1, keepdims=True)) / np.sqrt(self.head_dim)
            dqr, dkr = ds @ kr, ds.transpose(0, 1, 3, 2) @ qr
            dn1 = np.zeros_like(n1)
            for name, dr in (("q", dqr), ("k", dkr), ("v", None)):
                d = dv if dr is None else dr * cos + _rotate_half(dr * sin, sign=-1)
                d = d.transpose(0, 2, 1, 3).reshape(n1.shape)
                grads[p + f"self_attn.{name}_proj.weight"] = _outer(d, n1)
                dn1 += d @ w[p + f"self_attn.{name}_proj.weight"]
            dx, grads[p + "input_layernorm.weight"] = _rms_norm_back(dn1, c1)
            dh = dh + dx
        embed = np.zeros_like(w["model.embed_tokens.weight"])
        np.add.at(embed, ids.reshape(-1), dh.reshape(-1, dh.shape[-1]))
        grads["model.embed_tokens.weight"] = embed
        return grads

    def _heads(self, x: np.ndarray) -> np.ndarray:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).transpose(0, 2, 1, 3)


def _outer(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The gradient of a bias-free linear's weight (out, in) from its output's and input's."""
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def pretrain(
    weights: Weights,
    shape: dict[str, Any],
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
) -> tuple[Weights, list[float]]:
    """`weights` after `steps` Adam steps on `examples` (prompt ids, answer ids): the answers' tokens
    are learnt (as a chat model is tuned), in minibatches drawn with `seed`; and each step's loss."""
    model, rng = TinyLlama(shape), np.random.default_rng(seed)
    w = {k: v.astype(np.float32, copy=True) for k, v in weights.items()}
    m1 = {k: np.zeros_like(v) for k, v in w.items()}
    m2 = {k: np.zeros_like(v) for k, v in w.items()}
    beta1, beta2, losses = 0.9, 0.999, []
    for step in range(1, steps + 1):
        chosen = [examples[i] for i in rng.choice(len(examples), batch_size, replace=False)]
        ids = np.zeros((batch_size, max(len(p) + len(a) for p, a in chosen)), np.int64)
        mask = np.zeros(ids.shape, bool)  # positions whose next token is an answer's
        for row, (prompt, answer) in enumerate(chosen):
            ids[row, : len(prompt) + len(answer)] = [*prompt, *answer]
            mask[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
        loss, grads = model.loss_and_grads(w, ids, mask)
        losses.append(loss)
        lr = learning_rate * min(1.0, step / max(1, steps // 10))  # a short warm-up
        for k, g in grads.items():
            m1[k] = beta1 * m1[k] + (1 - beta1) * g
            m2[k] = beta2 * m2[k] + (1 - beta2) * g * g
            update = (m1[k] / (1 - beta1**step)) / (np.sqrt(m2[k] / (1 - beta2**step)) + 1e-8)
            w[k] -= (lr * update).astype(np.float32)
    return w, losses
