"""Typed model configuration.

`ModelConfig` is the single source of truth for the architecture. It is a frozen dataclass so it can be hashed
into jit static arguments and written next to checkpoints. gin binds it at the edge (see `gqa_uptrain.gin_utils`);
nothing here imports gin.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """T5.1.1 encoder-decoder with grouped-query attention.

    Head counts: every attention kind has `num_heads` query heads; the number of key/value heads is set per kind.
    Query head i uses key/value head i // (num_heads // num_kv_heads) (contiguous groups, as HF `repeat_kv`).
    A `None` kv-head count means "same as num_heads" (multi-head attention) and is stored as num_heads.
    """

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    encoder_kv_heads: int | None = None
    decoder_self_kv_heads: int | None = None
    decoder_cross_kv_heads: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    dtype: DType = "float32"  # activations
    param_dtype: DType = "float32"
    # Sharded cross-entropy friendly: T5.1.1 keeps a separate output projection (untied logits).
    logits_via_embedding: bool = False
    # Run each encoder/decoder stack as one nn.scan over a layer (stacked parameters inside the model) instead of
    # unrolling it: the same values and the same per-layer parameter tree outside the model (see model.Transformer),
    # a compiled program one layer long. A property of the program, not of the architecture: checkpoints written
    # with and without it are interchangeable.
    scan_layers: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for kind in ("encoder_kv_heads", "decoder_self_kv_heads", "decoder_cross_kv_heads"):
            g = getattr(self, kind)
            if g is None:
                continue
            if not isinstance(g, int) or g <= 0:
                raise ConfigError(f"ModelConfig.{kind} must be a positive integer or None, got {g!r}")
            if g > self.num_heads:
                raise ConfigError(
                    f"ModelConfig.{kind}={g} exceeds num_heads={self.num_heads}: a model cannot have more "
                    "key/value heads than query heads")
            if self.num_heads % g:
                divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
                raise ConfigError(
                    f"ModelConfig.{kind}={g} does not divide num_heads={self.num_heads}; "
                    f"valid key/value head counts are {divisors}")
        # Canonical form: None (MHA) is stored as num_heads so equal models compare and serialise equal.
        for kind in ("encoder_kv_heads", "decoder_self_kv_heads", "decoder_cross_kv_heads"):
            if getattr(self, kind) is None:
                object.__setattr__(self, kind, self.num_heads)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"ModelConfig.scan_layers must be True or False, got {self.scan_layers!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"ModelConfig.{name} must be float32, bfloat16 or float16, "
                                  f"got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_decoder_kv_heads(self, num_kv_heads: int) -> "ModelConfig":
        """The paper's conversion target: decoder self- and cross-attention get `num_kv_heads`, encoder stays."""
        return self.replace(decoder_self_kv_heads=num_kv_heads, decoder_cross_kv_heads=num_kv_heads)

    def kv_cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Decoder self-attention KV-cache bytes for one generated token (all layers, K and V)."""
        if dtype_bytes is None:
            dtype_bytes = 4 if self.dtype == "float32" else 2
        return 2 * self.num_decoder_layers * self.decoder_self_kv_heads * self.head_dim * dtype_bytes

    def cross_kv_bytes_per_source_token(self, dtype_bytes: int | None = None) -> int:
        """Cross-attention K/V bytes kept per encoder position while decoding (all decoder layers)."""
        if dtype_bytes is None:
            dtype_bytes = 4 if self.dtype == "float32" else 2
        return 2 * self.num_decoder_layers * self.decoder_cross_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)
