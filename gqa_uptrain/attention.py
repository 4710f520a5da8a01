"""Grouped-query dot-product attention, T5 relative position biases and the attention layer with a KV cache.

Conventions (checked by tests):
- Query head i belongs to key/value group i // (num_heads // num_kv_heads): contiguous groups, as HF `repeat_kv`.
- T5 has no 1/sqrt(head_dim) in the logits; the scale lives in the query initialiser.
- Keys and values are never repeated per query head: every path contracts queries grouped as
  [.., kv_heads, heads_per_group, ..] against K/V with kv_heads heads.

Implementation paths (`impl` on the layers; chosen by `attention_impl`, the only place that decides):
- 'reference': plain einsum attention (reference_attention), `x @ kernel`, `y * scale`; autodiff only. The
  definition the other paths are tested against.
- 'xla_cpu': gqa_uptrain.xla_cpu, the same maths written for XLA:CPU (custom VJPs, GEMV reductions, 2-D GEMMs).
- 'dot_product_attention' / 'cudnn': jax.nn.dot_product_attention (GQA natively) with implementation=None (JAX's
  choice) / 'cudnn'; no attention dropout. Dense and RMSNorm take the reference form on these paths.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_uptrain import xla_cpu
from gqa_uptrain.config import ConfigError
from gqa_uptrain.xla_cpu import BIG_NEG

Array = jax.Array

IMPLS = ("auto", "reference", "xla_cpu", "dot_product_attention", "cudnn")
_DPA_IMPLEMENTATION = {"dot_product_attention": None, "cudnn": "cudnn"}  # jax.nn.dot_product_attention(implementation=)
_logged_choices: set[tuple] = set()


def check_impl(name: str) -> str:
    """`name` if it is one of IMPLS, else a one-line ValueError listing them."""
    if name not in IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; valid: {', '.join(IMPLS)}")
    return name


def attention_impl(requested: str = "auto", *, dropout: bool = False, backend: str | None = None) -> str:
    """The implementation path the model runs: the one place it is chosen.

    'auto' picks by backend (jax.default_backend() unless `backend` is given): 'xla_cpu' on cpu; elsewhere
    'dot_product_attention', or 'reference' while attention dropout is on (dropout=True), which
    jax.nn.dot_product_attention does not have. Any other name is taken as asked; asking for a
    dot_product_attention path with attention dropout is a ValueError. Each distinct choice is logged once.
    """
    backend = backend or jax.default_backend()
    chosen = requested
    if check_impl(requested) == "auto":
        chosen = "xla_cpu" if backend == "cpu" else "reference" if dropout else "dot_product_attention"
    if dropout and chosen in _DPA_IMPLEMENTATION:
        raise ValueError(f"attention implementation {chosen!r} has no attention dropout; use 'auto', 'reference' "
                         "or 'xla_cpu', or set dropout_rate=0")
    key = (requested, backend, dropout, chosen)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logging.info("attention implementation: %s (asked %s, backend %s, attention dropout %s)", chosen, requested,
                     backend, "on" if dropout else "off")
    return chosen


def reference_attention(query: Array, key: Array, value: Array, bias: Array | None = None, mask: Array | None = None,
                        keep: Array | None = None, dropout_rate: float = 0.0) -> Array:
    """dropout(softmax(where(mask, q k^T + bias, BIG_NEG))) v, plainly, with autodiff; logits and softmax in float32.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim].
      bias: None or broadcastable to [batch, num_heads, q_len, kv_len].
      mask: None or boolean broadcastable to [batch, num_heads, q_len, kv_len]; True = attend. Rows with nothing
        to attend to get uniform weights.
      keep: None or the boolean dropout keep mask [batch, num_heads, q_len, kv_len]; kept weights are scaled by
        1 / (1 - dropout_rate).
    Returns:
      [batch, q_len, num_heads, head_dim] in query.dtype.
    """
    b, lq, h, d = query.shape
    lk, g = key.shape[1], key.shape[2]
    q = query.reshape(b, lq, g, h // g, d)  # head i = (group i // r, member i % r)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, key, preferred_element_type=jnp.float32).reshape(b, h, lq, lk)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, BIG_NEG)
    weights = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.reshape(b, g, h // g, lq, lk).astype(value.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", weights, value, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, d).astype(query.dtype)


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
    impl: str = "auto",
) -> Array:
    """Attention of H query heads over G shared key/value heads, on the path attention_impl(impl) picks.

    Args:
      query: [batch, q_len, num_heads, head_dim].
      key, value: [batch, kv_len, num_kv_heads, head_dim], num_heads % num_kv_heads == 0.
      bias: additive, broadcastable to [batch, num_heads, q_len, kv_len] (relative position bias).
      mask: boolean, [batch, 1 or num_heads, q_len, kv_len]; True = attend.
    Returns:
      [batch, q_len, num_heads, head_dim] in query.dtype.

    The dropout keep mask is drawn here, the same way for every path, so the paths agree under dropout too.
    """
    b, lq, h, d = query.shape
    g, lk = key.shape[2], key.shape[1]
    if key.shape[-1] != d or value.shape != key.shape:
        raise ValueError(f"key/value shapes {key.shape}/{value.shape} do not match query head_dim {d}")
    if h % g:
        raise ConfigError(f"num_heads={h} is not divisible by num_kv_heads={g}")
    dropout = not deterministic and dropout_rate > 0.0
    chosen = attention_impl(impl, dropout=dropout)
    keep = None
    if dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (b, g, h // g, lq, lk)).reshape(b, h, lq, lk)
    if chosen == "xla_cpu":
        return xla_cpu.grouped_attention(query, key, value, bias, mask, keep, dropout_rate)
    if chosen == "reference":
        return reference_attention(query, key, value, bias, mask, keep, dropout_rate)
    # T5's logits are unscaled (scale=1); bias is added before the mask, as in the other paths.
    return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=1.0,
                                        implementation=_DPA_IMPLEMENTATION[chosen])


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
    """y = x @ kernel with a 2-D kernel [in, out] (the T5X checkpoint layout) and logical axis names.

    impl: see attention_impl; 'xla_cpu' flattens the leading dims (xla_cpu.flat_matmul), same values.
    """

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Callable = _dense_init(1.0, "fan_in", "truncated_normal")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
        if attention_impl(self.impl) == "xla_cpu":
            return xla_cpu.flat_matmul(x, kernel)
        return x @ kernel


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
    impl: str = "auto"  # see attention_impl

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

        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl)
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
                                          dropout_rng=dropout_rng, deterministic=not enable_dropout,
                                          impl=self.impl)
        return out(y.reshape(b, lq, self.num_heads * self.head_dim))
