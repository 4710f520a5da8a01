"""T5.1.1 encoder-decoder (Flax linen) with grouped-query attention.

Parameter names are the checkpoint contract and follow T5X (`t5x/examples/t5/network.py`):

  token_embedder/embedding                                  [vocab, embed]
  encoder/relpos_bias/rel_embedding                          [heads, buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale          [embed]
  encoder/layers_{i}/attention/{query,key,value,out}/kernel
  encoder/layers_{i}/pre_mlp_layer_norm/scale
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel                  [embed, mlp];  mlp/wo/kernel [mlp, embed]
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/pre_self_attention_layer_norm/scale,  self_attention/...
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale, encoder_decoder_attention/...
  decoder/layers_{i}/pre_mlp_layer_norm/scale,             mlp/...
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel                                [embed, vocab]

Every parameter carries logical axis names (see `gqa_uptrain.sharding`).

Rematerialisation (`Transformer(config, remat_policy=...)`, training only) wraps each encoder/decoder layer in
`nn.remat`; the lifted layer keeps its name, so the parameter tree is the same for every policy.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_uptrain import xla_cpu
from gqa_uptrain.attention import Attention, Dense, RelativePositionBiases, _dense_init, attention_impl, check_impl
from gqa_uptrain.config import ModelConfig

Array = jax.Array

_ACT = ("activation_batch", "activation_length", "activation_embed")


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


# What each encoder/decoder layer keeps for the backward pass; what it does not keep is recomputed there from the
# layer's inputs. Remat is a property of the training step, not of the architecture: it is not in ModelConfig.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no jax.checkpoint: the backward keeps every intermediate it needs (today's program)
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer inputs; the whole layer is recomputed
    # The outputs of the un-batched GEMMs (Q/K/V/out projections, wi_0/wi_1/wo; MaxText's "minimal"); norms,
    # activations and the attention core (scores, softmax, weighted sum) are recomputed.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,  # every GEMM output, batched attention products included
}


def check_remat_policy(name: str) -> str:
    """`name` if it is a key of REMAT_POLICIES, else a one-line ValueError listing the valid names."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r} (REMAT_POLICY); valid: {', '.join(REMAT_POLICIES)}")
    return name


def _layer_class(layer: type[nn.Module], remat_policy: str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`layer` itself, or its nn.remat version. static_argnums (counting `self` as 0) are the python bool/int
    arguments: under jax.checkpoint they must be static or they would be traced. The dropout rng is lifted into the
    checkpointed scope, so the forward and the recomputation draw the same masks as without remat (tested)."""
    if check_remat_policy(remat_policy) == "none":
        return layer
    return nn.remat(layer, policy=REMAT_POLICIES[remat_policy], static_argnums=static_argnums)


class RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias; statistics in float32. impl: see attention.attention_impl."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        scale = jnp.asarray(scale, jnp.float32)
        y = xla_cpu.scale_features(y, scale) if attention_impl(self.impl) == "xla_cpu" else y * scale
        return y.astype(self.dtype)


class GatedGeluMlp(nn.Module):
    """T5.1.1 feed-forward: wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))."""

    d_ff: int
    dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"  # see attention.attention_impl

    @nn.compact
    def __call__(self, x: Array, enable_dropout: bool) -> Array:
        init = _dense_init(1.0, "fan_in", "truncated_normal")
        kw = dict(kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl)
        h = nn.gelu(Dense(self.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x), approximate=True)
        h = h * Dense(self.d_ff, ("embed", "mlp"), name="wi_1", **kw)(x)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not enable_dropout)
        return Dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h)


def _common(cfg: ModelConfig) -> dict:
    return dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))


def _with_impl(cfg: ModelConfig, impl: str) -> dict:
    """_common plus the implementation path, for the modules that have one (norms, attention, MLP)."""
    return dict(_common(cfg), impl=impl)


class EncoderLayer(nn.Module):
    config: ModelConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array, enable_dropout: bool) -> Array:
        cfg = self.config
        common = _with_impl(cfg, self.impl)
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_attention_layer_norm", **common)(x)
        h = Attention(cfg.num_heads, cfg.enc_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
                      name="attention", **common)(h, h, bias=bias, mask=mask, enable_dropout=enable_dropout)
        x = x + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_mlp_layer_norm", **common)(x)
        h = GatedGeluMlp(cfg.d_ff, cfg.dropout_rate, name="mlp", **common)(h, enable_dropout)
        x = x + drop(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x, _ACT)


class DecoderLayer(nn.Module):
    config: ModelConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, encoded: Array, self_bias: Array, self_mask: Array, cross_mask: Array | None,
                 enable_dropout: bool, decode: bool, decode_index: Array | None,
                 max_decode_length: int | None) -> Array:
        cfg = self.config
        common = _with_impl(cfg, self.impl)
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_self_attention_layer_norm", **common)(x)
        h = Attention(cfg.num_heads, cfg.dec_self_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
                      name="self_attention", **common)(
            h, h, bias=self_bias, mask=self_mask, enable_dropout=enable_dropout, decode=decode,
            decode_index=decode_index, max_decode_length=max_decode_length)
        x = x + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_cross_attention_layer_norm", **common)(x)
        h = Attention(cfg.num_heads, cfg.dec_cross_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
                      is_cross_attention=True, name="encoder_decoder_attention", **common)(
            h, encoded, mask=cross_mask, enable_dropout=enable_dropout, decode=decode)
        x = x + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_mlp_layer_norm", **common)(x)
        h = GatedGeluMlp(cfg.d_ff, cfg.dropout_rate, name="mlp", **common)(h, enable_dropout)
        x = x + drop(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x, _ACT)


def _pair_mask(q_valid: Array, k_valid: Array, q_segments: Array | None = None,
               k_segments: Array | None = None) -> Array:
    """[batch, q] and [batch, k] validity (and optional packing segment ids) -> bool [batch, 1, q, k]."""
    m = q_valid[:, :, None] & k_valid[:, None, :]
    if q_segments is not None and k_segments is not None:
        m = m & (q_segments[:, :, None] == k_segments[:, None, :])
    return m[:, None]


class Encoder(nn.Module):
    config: ModelConfig
    embedder: nn.Module
    remat_policy: str = "none"
    impl: str = "auto"

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, enable_dropout: bool = False) -> Array:
        """tokens [batch, src_len] (0 = padding) -> encoded [batch, src_len, embed]."""
        cfg = self.config
        length = tokens.shape[1]
        pos = jnp.arange(length, dtype=jnp.int32)
        bias = RelativePositionBiases(cfg.num_heads, cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance, bidirectional=True,
                                      name="relpos_bias", **_common(cfg))(pos, pos)
        mask = _pair_mask(tokens > 0, tokens > 0, segment_ids, segment_ids)
        x = self.embedder(tokens).astype(_dtype(cfg.dtype))
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, _ACT)
        layer = _layer_class(EncoderLayer, self.remat_policy, static_argnums=(4,))  # enable_dropout
        for i in range(cfg.num_encoder_layers):
            x = layer(cfg, impl=self.impl, name=f"layers_{i}")(x, bias, mask, enable_dropout)
        x = RMSNorm(cfg.layer_norm_epsilon, name="encoder_norm", **_with_impl(cfg, self.impl))(x)
        return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
    config: ModelConfig
    embedder: nn.Module
    remat_policy: str = "none"
    impl: str = "auto"

    @nn.compact
    def __call__(self, encoded: Array, encoder_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None, encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None, enable_dropout: bool = False, decode: bool = False,
                 max_decode_length: int | None = None) -> Array:
        """Logits [batch, tgt_len, vocab] (float32).

        Training / scoring: decoder_input_tokens [batch, tgt_len] are the shifted targets (BOS = 0); padding is
        taken from decoder_target_tokens (> 0) when given.
        Decoding: the first call with decode=True (prefill) creates the cache of length max_decode_length and
        processes the given prefix; every later call takes one token [batch, 1].
        """
        cfg = self.config
        b, lq = decoder_input_tokens.shape
        relpos = RelativePositionBiases(cfg.num_heads, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance, bidirectional=False,
                                        name="relpos_bias", **_common(cfg))
        enc_valid = encoder_tokens > 0
        decode_index = None
        if decode:
            prefill = not self.has_variable("cache", "step")
            step = self.variable("cache", "step", lambda: jnp.zeros((), jnp.int32))
            if prefill:
                if max_decode_length is None or max_decode_length < lq:
                    raise ValueError(f"prefill needs max_decode_length >= prefix length {lq}, "
                                     f"got {max_decode_length}")
                kv_len = max_decode_length
            else:
                kv_len = None
            decode_index = step.value
            q_pos = decode_index + jnp.arange(lq, dtype=jnp.int32)
            if kv_len is None:
                kv_len = self._cached_length()
            k_pos = jnp.arange(kv_len, dtype=jnp.int32)
            self_mask = jnp.broadcast_to((k_pos[None, :] <= q_pos[:, None])[None, None], (b, 1, lq, kv_len))
            q_valid = jnp.ones((b, lq), bool)
            step.value = decode_index + lq
        else:
            q_pos = k_pos = jnp.arange(lq, dtype=jnp.int32)
            q_valid = (decoder_target_tokens > 0) if decoder_target_tokens is not None else jnp.ones((b, lq), bool)
            causal = (k_pos[None, :] <= q_pos[:, None])[None, None]
            self_mask = _pair_mask(q_valid, q_valid, decoder_segment_ids, decoder_segment_ids) & causal
        self_bias = relpos(q_pos, k_pos)
        cross_mask = _pair_mask(q_valid, enc_valid, None if decode else decoder_segment_ids,
                                None if decode else encoder_segment_ids)

        x = self.embedder(decoder_input_tokens).astype(_dtype(cfg.dtype))
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, _ACT)
        # enable_dropout, decode, max_decode_length; never while decoding (no backward pass, and a cache to write).
        layer = _layer_class(DecoderLayer, "none" if decode else self.remat_policy, static_argnums=(6, 7, 9))
        for i in range(cfg.num_decoder_layers):
            x = layer(cfg, impl=self.impl, name=f"layers_{i}")(
                x, encoded, self_bias, self_mask, cross_mask, enable_dropout, decode, decode_index,
                max_decode_length)
        x = RMSNorm(cfg.layer_norm_epsilon, name="decoder_norm", **_with_impl(cfg, self.impl))(x)
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)
        if cfg.logits_via_embedding:
            logits = self.embedder.attend(x) / jnp.sqrt(x.shape[-1]).astype(jnp.float32)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), _dense_init(1.0, "fan_in", "truncated_normal"),
                           dtype=jnp.float32, param_dtype=_dtype(cfg.param_dtype), impl=self.impl,
                           name="logits_dense")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32),
                                          ("activation_batch", "activation_length", "activation_vocab"))

    def _cached_length(self) -> int:
        cache = self.variables["cache"]
        return cache["layers_0"]["self_attention"]["cached_key"].shape[2]


class Embed(nn.Module):
    """Token embedding shared by encoder and decoder; param `embedding` [vocab, embed], stddev 1 init."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")), (self.num_embeddings, self.features),
            self.param_dtype)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...e,ve->...v", x.astype(jnp.float32), jnp.asarray(self.embedding, jnp.float32))


class Transformer(nn.Module):
    """The full model. `__call__` is teacher-forced scoring; `encode` / `decode` are used by generation.

    remat_policy (a REMAT_POLICIES key) changes what the backward pass keeps, never values or parameters.
    impl (attention.IMPLS; 'auto' picks by backend in attention.attention_impl) changes how attention, norms and
    projections are computed, never parameters; values agree to rounding (tested).
    """

    config: ModelConfig
    remat_policy: str = "none"
    impl: str = "auto"

    def setup(self) -> None:
        cfg = self.config
        check_remat_policy(self.remat_policy)
        check_impl(self.impl)
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, **_common(cfg))
        self.encoder = Encoder(cfg, self.token_embedder, self.remat_policy, impl=self.impl)
        self.decoder = Decoder(cfg, self.token_embedder, self.remat_policy, impl=self.impl)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               enable_dropout: bool = False) -> Array:
        return self.encoder(encoder_input_tokens, encoder_segment_ids, enable_dropout)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                            encoder_segment_ids, decoder_segment_ids, enable_dropout, decode, max_decode_length)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None, encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None, enable_dropout: bool = False) -> Array:
        """encoder_input_tokens [batch, src_len], decoder_input_tokens [batch, tgt_len] -> logits
        [batch, tgt_len, vocab] float32."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, enable_dropout)


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, src_len: int = 8, tgt_len: int = 8):
    """Initialise parameters (unboxed arrays) with T5X's initialisers."""
    model = Transformer(config)
    variables = model.init(rng, jnp.ones((batch, src_len), jnp.int32), jnp.ones((batch, tgt_len), jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(config: ModelConfig):
    """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the parameters, without allocating anything."""
    model = Transformer(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                                               jnp.ones((1, 8), jnp.int32)))
    return shapes["params"]
