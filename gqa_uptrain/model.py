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

Layer scanning (`ModelConfig.scan_layers`) runs each stack as one `nn.scan` over a layer (nn.remat inside the scan
body), so XLA compiles one layer instead of 24: inside the model the parameters are
{encoder,decoder}/layers/layer/... [layers, ...] (logical axis 'layers', never sharded) and the decode cache is
[layers, batch, kv_heads, length, head_dim]. The parameter tree every caller passes and receives stays the one above
(`Transformer` maps it with `stack_layers` / `unstack_layers`), so checkpoints, converters, name tables, the
optimiser state and its shardings do not depend on the option.
"""
from __future__ import annotations

import re
from typing import Any, Callable

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
        h = Attention(cfg.num_heads, cfg.encoder_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
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
        h = Attention(cfg.num_heads, cfg.decoder_self_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
                      name="self_attention", **common)(
            h, h, bias=self_bias, mask=self_mask, enable_dropout=enable_dropout, decode=decode,
            decode_index=decode_index, max_decode_length=max_decode_length)
        x = x + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_cross_attention_layer_norm", **common)(x)
        h = Attention(cfg.num_heads, cfg.decoder_cross_kv_heads, cfg.head_dim, cfg.d_model, cfg.dropout_rate,
                      is_cross_attention=True, name="encoder_decoder_attention", **common)(
            h, encoded, mask=cross_mask, enable_dropout=enable_dropout, decode=decode)
        x = x + drop(h, deterministic=not enable_dropout)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_mlp_layer_norm", **common)(x)
        h = GatedGeluMlp(cfg.d_ff, cfg.dropout_rate, name="mlp", **common)(h, enable_dropout)
        x = x + drop(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x, _ACT)


class _ScanBody(nn.Module):
    """One encoder/decoder layer as an nn.scan body: (x, *broadcast arrays) -> (x, None).

    The layer's python arguments (enable_dropout, decode, max_decode_length) are attributes here, so every argument
    the scan and an enclosing nn.remat see is an array (or None)."""

    layer: type[nn.Module]
    config: ModelConfig
    array_names: tuple[str, ...]  # the layer's keyword names for *args
    static_kwargs: tuple[tuple[str, object], ...]
    impl: str = "auto"  # see attention.attention_impl

    @nn.compact
    def __call__(self, x: Array, *args: Array | None) -> tuple[Array, None]:
        kwargs = dict(zip(self.array_names, args), **dict(self.static_kwargs))
        return self.layer(self.config, impl=self.impl, name="layer")(x, **kwargs), None


# Name of the scanned stack inside the model ({encoder,decoder}/layers/layer/..., leading axis = layer); the
# parameter tree outside the model keeps T5X's layers_{i} (stack_layers / unstack_layers).
SCANNED = "layers"


def _scanned_stack(layer: type[nn.Module], cfg: ModelConfig, remat_policy: str, num_layers: int,
                   array_names: tuple[str, ...], static_kwargs: tuple[tuple[str, object], ...],
                   impl: str = "auto") -> nn.Module:
    """`num_layers` copies of `layer` as one nn.scan (nn.remat inside it when a policy is set). Parameters and the
    decode cache get a leading [layers] axis, logical name 'layers' (never sharded: each device runs every layer);
    every layer draws its own params/dropout rngs. Called as (x, *arrays) (the arrays named by `array_names`), it
    returns (x, None)."""
    body = _ScanBody
    if check_remat_policy(remat_policy) != "none":
        body = nn.remat(_ScanBody, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(layer, cfg, array_names, static_kwargs, impl, name=SCANNED)


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
        if cfg.scan_layers:
            x = _scanned_stack(EncoderLayer, cfg, self.remat_policy, cfg.num_encoder_layers, ("bias", "mask"),
                               (("enable_dropout", enable_dropout),), self.impl)(x, bias, mask)[0]
        else:
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
        # Remat never while decoding (no backward pass, and a cache to write).
        remat_policy = "none" if decode else self.remat_policy
        if cfg.scan_layers:
            x = _scanned_stack(DecoderLayer, cfg, remat_policy, cfg.num_decoder_layers,
                               ("encoded", "self_bias", "self_mask", "cross_mask", "decode_index"),
                               (("enable_dropout", enable_dropout), ("decode", decode),
                                ("max_decode_length", max_decode_length)), self.impl)(
                x, encoded, self_bias, self_mask, cross_mask, decode_index)[0]
        else:
            # enable_dropout, decode, max_decode_length are static under remat.
            layer = _layer_class(DecoderLayer, remat_policy, static_argnums=(6, 7, 9))
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
        if self.config.scan_layers:  # [layers, batch, kv_heads, length, head_dim]
            return cache[SCANNED]["layer"]["self_attention"]["cached_key"].shape[3]
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


class TransformerModule(nn.Module):
    """The full model (build it with `Transformer`). `__call__` is teacher-forced scoring; `encode` / `decode` are
    used by generation.

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


def _map_stacks(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """`tree` with fn applied to its 'encoder' and 'decoder' subtrees (other keys as they are)."""
    out = dict(tree)
    for stack in ("encoder", "decoder"):
        if stack in out:
            out[stack] = fn(dict(out[stack]))
    return out


def _layer_index(key: str) -> int | None:
    m = re.fullmatch(r"layers_(\d+)", key)
    return int(m.group(1)) if m else None


def stack_layers(params: Any) -> Any:
    """T5X per-layer parameters -> the scanned model's layout (pure; arrays, ShapeDtypeStructs or boxed).

    {encoder,decoder}/layers_{i}/X [...] (i = 0..L-1) become {encoder,decoder}/layers/layer/X [L, ...]; boxed
    (nn.LogicallyPartitioned) leaves get the logical axis 'layers' in front. A tree that is already stacked (no
    layers_{i} keys) is returned as it is. Missing or extra layer numbers are a ValueError naming them.
    """
    def stack(sub: dict) -> dict:
        idx = sorted(i for k in sub if (i := _layer_index(k)) is not None)
        if not idx:
            return sub
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ValueError(f"layers are not numbered 0..{len(idx) - 1}: missing layers_{missing[0]}")
        layers = [sub.pop(f"layers_{i}") for i in idx]
        sub[SCANNED] = {"layer": jax.tree.map(_stack_leaves, *layers, is_leaf=_is_boxed)}
        return sub
    return _map_stacks(params, stack)


def unstack_layers(params: Any) -> Any:
    """The scanned model's layout -> T5X per-layer parameters; the inverse of `stack_layers` (pure)."""
    def unstack(sub: dict) -> dict:
        if SCANNED not in sub:
            return sub
        stacked = sub.pop(SCANNED)["layer"]
        n = {_unboxed(x).shape[0] for x in jax.tree.leaves(stacked, is_leaf=_is_boxed)}
        if len(n) != 1:
            raise ValueError(f"stacked layers disagree on the number of layers: {sorted(n)}")
        for i in range(n.pop()):
            sub[f"layers_{i}"] = jax.tree.map(lambda x: _take_layer(x, i), stacked, is_leaf=_is_boxed)
        return sub
    return _map_stacks(params, unstack)


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _unboxed(x: Any) -> Any:
    return x.value if _is_boxed(x) else x


def _stack_leaves(*xs: Any) -> Any:
    if _is_boxed(xs[0]):
        return xs[0].replace(value=_stack_leaves(*(x.value for x in xs)), names=("layers",) + tuple(xs[0].names))
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
    return jnp.stack(xs)


def _take_layer(x: Any, i: int) -> Any:
    if _is_boxed(x):
        names = tuple(x.names)
        if names[:1] != ("layers",):
            raise ValueError(f"a stacked parameter's first logical axis must be 'layers', got {names}")
        return x.replace(value=_take_layer(x.value, i), names=names[1:])
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
    return x[i]


# With scan_layers the module runs on stacked parameters; this lifted version takes and gives the per-layer tree, so
# every caller (trainer, decoder, converters, checkpoints) sees the same names either way. Gradients flow through
# the stacking; the price is one stacked copy of the parameters while the program runs.
_ScannedTransformerModule = nn.map_variables(
    TransformerModule, "params", trans_in_fn=lambda v: {c: stack_layers(t) for c, t in v.items()},
    trans_out_fn=lambda v: {c: unstack_layers(t) for c, t in v.items()}, mutable=True,
    methods=["__call__", "encode", "decode"])


def Transformer(config: ModelConfig, remat_policy: str = "none", impl: str = "auto") -> TransformerModule:  # noqa: N802
    """The model for `config`: parameters are always in the T5X per-layer layout (layers_{i}); with
    config.scan_layers the stacks run as nn.scan on a stacked view of them (see ModelConfig.scan_layers)."""
    cls = _ScannedTransformerModule if config.scan_layers else TransformerModule
    return cls(config, remat_policy, impl=impl)



def _boxed_init(config: ModelConfig, rng: jax.Array):
    """Initial parameters, boxed with their logical axes (T5X's initialisers; shapes do not depend on the dummy
    [1, 8] inputs). The one place the model is initialised: init_params and abstract_params are its two views."""
    ones = jnp.ones((1, 8), jnp.int32)
    return Transformer(config).init(rng, ones, ones)["params"]


def init_params(config: ModelConfig, rng: jax.Array):
    """Initialise parameters (unboxed arrays) with T5X's initialisers."""
    return nn.meta.unbox(_boxed_init(config, rng))


def abstract_params(config: ModelConfig):
    """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the parameters, without allocating anything."""
    return jax.eval_shape(lambda: _boxed_init(config, jax.random.PRNGKey(0)))
