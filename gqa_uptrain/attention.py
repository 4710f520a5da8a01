"""Grouped-query dot-product attention, T5 relative position biases and the attention layer with a KV cache.

Conventions (checked by tests):
- Query head i belongs to key/value group i // (num_heads // num_kv_heads): contiguous groups, as HF `repeat_kv`.
- T5 has no 1/sqrt(head_dim) in the logits; the scale lives in the query initialiser.
- Keys and values are never repeated per query head: queries are regrouped to
  [batch, kv_heads, heads_per_group * q_len, head_dim] and contracted against [batch, kv_heads, kv_len, head_dim].
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_uptrain.config import ConfigError

Array = jax.Array
# Finite so fully-masked rows (padding queries) stay NaN-free; far below any real logit.
BIG_NEG = -1e10


def sum_leading_axes(x: Array, num_axes: int) -> Array:
    """Sum over the first `num_axes` axes as a ones-vector GEMV. XLA:CPU lowers a reduction over leading
    (non-minor) axes to a slow loop (17 ms vs 0.2 ms for [16, 131072] here); a GEMV is fast on every backend."""
    lead = math.prod(x.shape[:num_axes])
    ones = jnp.ones((1, lead), x.dtype)
    return jnp.matmul(ones, x.reshape(lead, -1), precision=jax.lax.Precision.HIGHEST).reshape(x.shape[num_axes:])


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

    The GEMMs see [b, g, r*q_len, ...] (plain 4-D batched matmuls, contiguous on every backend; a 5-D einsum over
    (g, r) made XLA:CPU's backward ~2x slower). The VJP is written out because XLA:CPU's time here goes to
    elementwise passes and reductions over the [b, g, r*q_len, kv_len] weights, and this needs fewer of them:
    the forward applies 1/sum to the [.., d] output instead of the weights; the backward's row sum
    sum_k(dL/dp * p) is do.o over d (as in FlashAttention) instead of a sum over kv_len, and the weights'
    gradient is one elementwise pass.
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
    product on its fast GEMM path (YNNPACK) but x^T y on a slower one (~2x, 2.9 vs 1.5 ms at [16, 8, 128, 128]
    including the transpose to token-major that follows)."""
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


def grouped_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """Attention of H query heads over G shared key/value heads.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim], num_heads % num_kv_heads == 0.
      bias: additive, broadcastable to [batch, num_heads, q_len, kv_len] (relative position bias).
      mask: boolean, broadcastable to [batch, 1 or num_heads, q_len, kv_len]; True = attend.
    Returns:
      [batch, q_len, num_heads, head_dim] in query.dtype.
    """
    b, lq, h, d = query.shape
    g = key.shape[2]
    if key.shape[-1] != d or value.shape != key.shape:
        raise ValueError(f"key/value shapes {key.shape}/{value.shape} do not match query head_dim {d}")
    if h % g:
        raise ConfigError(f"num_heads={h} is not divisible by num_kv_heads={g}")
    r = h // g
    lk = key.shape[1]
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
    keep = None
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (b, g, r, lq, lk))
    out = softmax_attention(q, k, v, bias, mask, keep, dropout_rate)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's log-spaced bucketing of (key_position - query_position) into [0, num_buckets)."""
    n = -relative_position
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Same operation order as the reference implementations so bucket boundaries agree exactly.
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


def _dense_init(scale: float, mode: str, distribution: str) -> Callable:
    return nn.initializers.variance_scaling(scale, mode, distribution)


class Dense(nn.Module):
    """y = x @ kernel with a 2-D kernel [in, out] (the T5X checkpoint layout) and logical axis names."""

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Callable = _dense_init(1.0, "fan_in", "truncated_normal")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), self.param_dtype)
        # Flatten leading dims: a 2-D GEMM keeps XLA:CPU's weight-gradient contraction a single fast GEMM too.
        y = x.astype(self.dtype).reshape(-1, x.shape[-1]) @ jnp.asarray(kernel, self.dtype)
        return y.reshape(*x.shape[:-1], self.features)


class RelativePositionBiases(nn.Module):
    """T5 relative position bias; one table per stack, computed in the first layer and shared by all layers.

    Param `rel_embedding`: [num_heads, num_buckets].
    """

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """query_positions [q_len], key_positions [kv_len] (int32) -> bias [1, num_heads, q_len, kv_len]."""
        table = self.param("rel_embedding",
                           nn.with_logical_partitioning(_dense_init(1.0, "fan_avg", "uniform"),
                                                        ("heads", "relpos_buckets")),
                           (self.num_heads, self.num_buckets), self.param_dtype)
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)  # [heads, q, k]
        return bias[None]


class Attention(nn.Module):
    """T5 attention layer with `num_heads` query heads and `num_kv_heads` key/value heads.

    Params (T5X names): query/kernel [embed, heads*head_dim], key/kernel and value/kernel
    [embed, kv_heads*head_dim], out/kernel [heads*head_dim, embed]. K/V weights have the reduced width, so the
    KV cache and the K/V projections shrink by num_heads / num_kv_heads.

    Decoding (`decode=True`) keeps a 'cache' collection:
      self-attention:  cached_key / cached_value [batch, kv_heads, max_len, head_dim], written at `decode_index`;
      cross-attention: cached_key / cached_value [batch, kv_heads, src_len, head_dim], projected once from the
                       encoder output on the first (prefill) call and reused afterwards.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int
    dropout_rate: float = 0.0
    is_cross_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        bias: Array | None = None,
        mask: Array | None = None,
        enable_dropout: bool = False,
        decode: bool = False,
        decode_index: Array | None = None,
        max_decode_length: int | None = None,
    ) -> Array:
        """inputs_q [batch, q_len, embed], inputs_kv [batch, kv_len, embed] -> [batch, q_len, embed].

        With decode=True the mask/bias must cover the cached key length (max_decode_length for self-attention,
        the source length for cross-attention).
        """
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        # Folding 1/sqrt(head_dim) into the query initialiser keeps T5's unscaled dot product well conditioned.
        depth_scaling = math.sqrt(self.head_dim)
        base = _dense_init(1.0, "fan_in", "normal")

        def query_init(key, shape, dtype=jnp.float32):
            return base(key, shape, dtype) / depth_scaling

        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = Dense(self.num_heads * self.head_dim, ("embed", "joined_kv"), query_init, name="query", **common)
        kv_axes = ("embed", "joined_grouped_kv")
        key = Dense(self.num_kv_heads * self.head_dim, kv_axes, base, name="key", **common)
        value = Dense(self.num_kv_heads * self.head_dim, kv_axes, base, name="value", **common)
        out = Dense(self.out_features, ("joined_kv", "embed"), base, name="out", **common)

        def project_kv(x: Array) -> tuple[Array, Array]:
            return (key(x).reshape(*x.shape[:2], self.num_kv_heads, self.head_dim),
                    value(x).reshape(*x.shape[:2], self.num_kv_heads, self.head_dim))

        b, lq, _ = inputs_q.shape
        q = query(inputs_q).reshape(b, lq, self.num_heads, self.head_dim)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads",
                                           "activation_kv"))
        if decode and self.is_cross_attention:
            if self.has_variable("cache", "cached_key"):
                k = self.get_variable("cache", "cached_key").transpose(0, 2, 1, 3)
                v = self.get_variable("cache", "cached_value").transpose(0, 2, 1, 3)
            else:
                k, v = project_kv(inputs_kv)
                self.put_variable("cache", "cached_key", k.transpose(0, 2, 1, 3))
                self.put_variable("cache", "cached_value", v.transpose(0, 2, 1, 3))
        elif decode:
            k_new, v_new = project_kv(inputs_kv)
            if not self.has_variable("cache", "cached_key") and max_decode_length is None:
                raise ValueError("the first decode call (prefill) must pass max_decode_length")
            shape = (b, self.num_kv_heads, max_decode_length or 0, self.head_dim)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, k_new.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, v_new.dtype)
            idx = jnp.asarray(decode_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            ck.value = jax.lax.dynamic_update_slice(ck.value, k_new.transpose(0, 2, 1, 3), (zero, zero, idx, zero))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v_new.transpose(0, 2, 1, 3), (zero, zero, idx, zero))
            k = ck.value.transpose(0, 2, 1, 3)
            v = cv.value.transpose(0, 2, 1, 3)
        else:
            k, v = project_kv(inputs_kv)
        dropout_rng = self.make_rng("dropout") if enable_dropout and self.dropout_rate > 0 else None
        y = grouped_dot_product_attention(q, k, v, bias, mask, dropout_rate=self.dropout_rate,
                                          dropout_rng=dropout_rng, deterministic=not enable_dropout)
        return out(y.reshape(b, lq, self.num_heads * self.head_dim))
