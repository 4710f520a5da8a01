"""The XLA:CPU fast path: the reference model's maths, written so that XLA:CPU compiles it to fast kernels.

Every function here computes exactly what its plain counterpart computes (attention.reference_attention,
`y * scale`, `x @ kernel`; tests hold them equal, values and gradients) and exists only because XLA:CPU lowers the
plain form slowly: reductions over leading axes become loops, some GEMM layouts miss its fast (YNNPACK) path, and the
autodiff backward of softmax attention makes more elementwise passes over the weights than it needs. The model uses
this path where `attention.attention_impl` picks 'xla_cpu' (by default on CPU). Timings: docs/bench/cpu_fast_paths.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
# Finite so fully-masked rows (padding queries) stay NaN-free; far below any real logit.
BIG_NEG = -1e10


def sum_leading_axes(x: Array, num_axes: int) -> Array:
    """Sum over the first `num_axes` axes, as a ones-vector GEMV: XLA:CPU lowers a reduction over leading
    (non-minor) axes to a slow loop, while a GEMV is fast on every backend."""
    lead = math.prod(x.shape[:num_axes])
    ones = jnp.ones((1, lead), x.dtype)
    return jnp.matmul(ones, x.reshape(lead, -1), precision=jax.lax.Precision.HIGHEST).reshape(x.shape[num_axes:])


@jax.custom_vjp
def scale_features(y: Array, scale: Array) -> Array:
    """y [..., d] * scale [d]; the scale's gradient (a sum over every leading axis) is done by sum_leading_axes."""
    return y * scale


def _scale_features_fwd(y, scale):
    return y * scale, (y, scale)


def _scale_features_bwd(res, g):
    y, scale = res
    return g * scale, sum_leading_axes(g * y, g.ndim - 1)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


def flat_matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out] with the leading dims flattened: a 2-D GEMM keeps XLA:CPU's weight-gradient
    contraction a single fast GEMM too."""
    y = x.reshape(-1, x.shape[-1]) @ kernel
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def softmax_attention(q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None, keep: Array | None,
                      dropout_rate: float) -> Array:
    """dropout(softmax(where(mask, q k^T + bias, BIG_NEG))) v for each key/value group; softmax in float32.

    Args:
      q: [b, g, r, q_len, d]: the r query heads that share key/value group g.
      k, v: [b, g, kv_len, d].
      bias: None or float32 [1 or b, g, r, q_len, kv_len].
      mask: None or boolean broadcastable to [b, g, r, q_len, kv_len]; True = attend. Rows with nothing to attend
        to get uniform weights (for logits below 512 in magnitude; the mask is added as BIG_NEG) and pass no gradient.
      keep: None or the boolean dropout keep mask [b, g, r, q_len, kv_len]; kept weights are scaled by
        1 / (1 - dropout_rate).
    Returns:
      [b, g, r, q_len, d] in q.dtype.

    The GEMMs see [b, g, r*q_len, ...] (plain 4-D batched matmuls; XLA:CPU's backward of a 5-D einsum over (g, r)
    is slower). The VJP is written out because XLA:CPU's time here goes to elementwise passes and reductions over
    the [b, g, r*q_len, kv_len] weights, and this needs fewer of them: the forward applies 1/sum to the [.., d]
    output instead of the weights; the backward's row sum sum_k(dL/dp * p) is do.o over d (as in FlashAttention)
    instead of a sum over kv_len, and the weights' gradient is one elementwise pass.
    """
    return _softmax_attention_fwd(q, k, v, bias, mask, keep, dropout_rate)[0]


def _dropout_scale(keep: Array, dropout_rate: float) -> Array:
    return jnp.where(keep, 1.0 / (1.0 - dropout_rate), 0.0)


def _softmax_attention_fwd(q, k, v, bias, mask, keep, dropout_rate):
    b, g, r, lq, d = q.shape
    q4 = q.reshape(b, g, r * lq, d)
    x = jnp.einsum("bgmd,bgkd->bgmk", q4, k, preferred_element_type=jnp.float32).reshape(b, g, r, lq, -1)
    # The mask is added (0 / BIG_NEG) rather than selected: XLA:CPU then fuses the logits GEMM, the additive term,
    # max and exp into one YNNPACK fusion instead of a separate select pass over [b, g, r, q_len, kv_len]. Same
    # weights: x + BIG_NEG rounds to BIG_NEG for |x| < 512 (half its float32 ulp), and exp underflows to 0 either
    # way. Bias and mask are summed first: YNNPACK takes the term broadcast to the full logits shape, and one
    # such tensor (shared by the layers of a stack) is half the memory traffic of two.
    add = None
    if mask is not None:
        add = jnp.where(mask, 0.0, BIG_NEG)
    if bias is not None:
        add = bias if add is None else bias + add
    if add is not None:
        x = x + add
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # unnormalised weights [b, g, r, lq, lk]
    inv_sum = 1.0 / jnp.sum(e, axis=-1, keepdims=True)  # [b, g, r, lq, 1]
    w = e if keep is None else e * _dropout_scale(keep, dropout_rate)
    o = jnp.einsum("bgmk,bgkd->bgmd", w.reshape(b, g, r * lq, -1).astype(v.dtype), v,
                   preferred_element_type=jnp.float32).reshape(b, g, r, lq, d) * inv_sum
    # The logits' gradient is zero where masked: e is exactly 0 there, except in rows with nothing to attend to
    # (uniform weights), which this zero factor covers. Cheaper than a select over the weights' gradient.
    inv_sum_attending = inv_sum if mask is None else jnp.where(jnp.any(mask, -1, keepdims=True), inv_sum, 0.0)
    return o.astype(q.dtype), (q, k, v, bias, keep, e, inv_sum, inv_sum_attending, o)


def _contract_rows(x: Array, y: Array) -> Array:
    """x [b, g, m, k], y [b, g, m, d] -> x^T y [b, g, k, d], computed as (y^T x)^T: XLA:CPU runs the [d, m] x [m, k]
    product on its fast GEMM path (YNNPACK) but x^T y on a slower one."""
    return jnp.einsum("bgdm,bgmk->bgdk", y.swapaxes(-1, -2), x).swapaxes(-1, -2)


def _softmax_attention_bwd(dropout_rate, res, do):
    q, k, v, bias, keep, e, inv_sum, inv_sum_attending, o = res
    b, g, r, lq, d = q.shape
    f32 = jnp.float32
    do = do.astype(f32)
    # The forward's 1/sum, applied to the [.., d] tensors: p = e * inv_sum is never formed.
    w = e if keep is None else e * _dropout_scale(keep, dropout_rate)
    dv = _contract_rows(w.reshape(b, g, r * lq, -1), (do * inv_sum).reshape(b, g, r * lq, d))
    do_s = (do * inv_sum_attending).reshape(b, g, r * lq, d)
    dw = jnp.einsum("bgmd,bgkd->bgmk", do_s, v.astype(f32)).reshape(e.shape)  # dL/dweights * inv_sum
    if keep is not None:
        dw = dw * _dropout_scale(keep, dropout_rate)
    row = jnp.sum(do * o, axis=-1, keepdims=True) * inv_sum_attending  # sum_k(dL/dp * p) * inv_sum
    ds = e * (dw - row)  # = p * (dL/dp - sum_k(dL/dp * p)), the logits' gradient
    ds4 = ds.reshape(b, g, r * lq, -1)
    dq = jnp.einsum("bgmk,bgkd->bgmd", ds4, k.astype(f32)).reshape(q.shape)
    dk = _contract_rows(ds4, q.reshape(b, g, r * lq, d).astype(f32))
    if bias is None:
        dbias = None
    elif bias.shape[0] == 1 and b != 1:
        dbias = sum_leading_axes(ds, 1)[None]  # a bias shared by the batch: its gradient is a batch sum
    else:
        dbias = ds
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def grouped_attention(query: Array, key: Array, value: Array, bias: Array | None, mask: Array | None,
                      keep: Array | None, dropout_rate: float) -> Array:
    """attention.reference_attention's contract ([batch, len, heads, head_dim] in and out, keep [b, H, q, k]) on
    softmax_attention: queries regrouped to [batch, kv_heads, heads_per_group, q_len, head_dim], K/V heads-major."""
    b, lq, h, d = query.shape
    g, lk = key.shape[2], key.shape[1]
    r = h // g
    # Heads-major: query head i = (group i // r, member i % r), contiguous groups as HF's repeat_kv.
    q = query.reshape(b, lq, g, r, d).transpose(0, 2, 3, 1, 4)
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], h, lq, lk)).reshape(bias.shape[0], g, r, lq, lk)
        bias = bias.astype(jnp.float32)
    if mask is not None:
        mh = mask.shape[1]
        mask = mask.reshape(mask.shape[0], g if mh == h else 1, r if mh == h else 1, lq, lk)
    if keep is not None:
        keep = keep.reshape(b, g, r, lq, lk)
    out = softmax_attention(q, k, v, bias, mask, keep, dropout_rate)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
