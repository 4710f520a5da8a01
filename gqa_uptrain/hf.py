"""Hugging Face T5 <-> gqa_uptrain parameter names: one table plus small hook functions (MaxText param_mapping
style), used by the HF reader (`params_from_hf`) and the exporter (`hf_from_params`).

Conventions
- Our kernels are [in, out] (T5X); HF `nn.Linear.weight` is [out, in]: hook `linear` transposes.
- Our relative-position table is [heads, buckets]; HF `relative_attention_bias.weight` is [buckets, heads] and
  lives only in block 0 of each stack: hook `relpos` transposes.
- Head order is contiguous on both sides: the joined width heads*head_dim is head-major, and query head i uses
  key/value head i // (num_heads // num_kv_heads) (HF `repeat_kv`, Llama 2, Mistral).
- Output projection: HF T5 computes `lm_head(x * s)` with s = d_model**-0.5 when `scale_decoder_outputs`
  (transformers 5.x; older configs: `tie_word_embeddings` not False) and s = 1 otherwise. The reader folds s into
  `decoder/logits_dense/kernel` = (lm_head.weight or shared.weight).T * s, so every imported model is an untied
  T5.1.1 model with `logits_via_embedding=False`. The exporter always writes an explicit `lm_head.weight` with
  `tie_word_embeddings=False` (transformers 5.x then loads it untied and unscaled).
- GQA: K/V kernels of width kv_heads*head_dim. Exported configs carry `gqa_encoder_kv_heads`,
  `gqa_decoder_self_kv_heads`, `gqa_decoder_cross_kv_heads` when they differ from num_heads; stock HF T5 cannot load
  such K/V shapes (see docs/convert.md), `expand_kv=True` writes repeated K/V that it can load.

Nothing here reads or writes files; `gqa_uptrain.readers` and `gqa_uptrain.export` do the I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from gqa_uptrain.config import ModelConfig

Array = np.ndarray

# ------------------------------------------------------------------------------------------------- hooks
# Each hook is a pair (hf -> ours, ours -> hf) of pure functions on numpy arrays.


def _identity(x: Array) -> Array:
    return x


def _transpose(x: Array) -> Array:
    return np.ascontiguousarray(np.asarray(x).T)


HOOKS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "identity": (_identity, _identity),
    "linear": (_transpose, _transpose),   # HF [out, in] <-> ours [in, out]
    "relpos": (_transpose, _transpose),   # HF [buckets, heads] <-> ours [heads, buckets]
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One name template pair. `{i}` is the layer index; `stack` says which layer count expands it."""

    hf: str
    ours: str
    hook: str
    stack: str | None = None  # None (global), "encoder" or "decoder"


def _attn(hf_prefix: str, ours_prefix: str, stack: str) -> list[Rule]:
    return [Rule(f"{hf_prefix}.{a}.weight", f"{ours_prefix}/{b}/kernel", "linear", stack)
            for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))]


def _mlp(hf_prefix: str, ours_prefix: str, stack: str) -> list[Rule]:
    return [Rule(f"{hf_prefix}.DenseReluDense.{w}.weight", f"{ours_prefix}/mlp/{w}/kernel", "linear", stack)
            for w in ("wi_0", "wi_1", "wo")]


NAME_TABLE: tuple[Rule, ...] = tuple([
    Rule("shared.weight", "token_embedder/embedding", "identity"),
    Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "encoder/relpos_bias/rel_embedding", "relpos"),
    Rule("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale", "identity"),
    Rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "decoder/relpos_bias/rel_embedding", "relpos"),
    Rule("decoder.final_layer_norm.weight", "decoder/decoder_norm/scale", "identity"),
    # lm_head is handled by `params_from_hf` / `hf_from_params` (optional in HF files, scale folding).
    Rule("encoder.block.{i}.layer.0.layer_norm.weight", "encoder/layers_{i}/pre_attention_layer_norm/scale",
         "identity", "encoder"),
    *_attn("encoder.block.{i}.layer.0.SelfAttention", "encoder/layers_{i}/attention", "encoder"),
    Rule("encoder.block.{i}.layer.1.layer_norm.weight", "encoder/layers_{i}/pre_mlp_layer_norm/scale",
         "identity", "encoder"),
    *_mlp("encoder.block.{i}.layer.1", "encoder/layers_{i}", "encoder"),
    Rule("decoder.block.{i}.layer.0.layer_norm.weight", "decoder/layers_{i}/pre_self_attention_layer_norm/scale",
         "identity", "decoder"),
    *_attn("decoder.block.{i}.layer.0.SelfAttention", "decoder/layers_{i}/self_attention", "decoder"),
    Rule("decoder.block.{i}.layer.1.layer_norm.weight",
         "decoder/layers_{i}/pre_cross_attention_layer_norm/scale", "identity", "decoder"),
    *_attn("decoder.block.{i}.layer.1.EncDecAttention", "decoder/layers_{i}/encoder_decoder_attention", "decoder"),
    Rule("decoder.block.{i}.layer.2.layer_norm.weight", "decoder/layers_{i}/pre_mlp_layer_norm/scale",
         "identity", "decoder"),
    *_mlp("decoder.block.{i}.layer.2", "decoder/layers_{i}", "decoder"),
])

LM_HEAD = "lm_head.weight"
LOGITS_KERNEL = "decoder/logits_dense/kernel"
# Copies of shared.weight that HF state dicts may carry; ignored on read, never written.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
GQA_FIELDS = {"gqa_encoder_kv_heads": "encoder_kv_heads", "gqa_decoder_self_kv_heads": "decoder_self_kv_heads",
              "gqa_decoder_cross_kv_heads": "decoder_cross_kv_heads"}


@dataclasses.dataclass(frozen=True)
class NameMapping:
    hf: str
    ours: str
    hook: str


def name_map(config: ModelConfig) -> list[NameMapping]:
    """Every (HF name, our flat name, hook) for a config, in a stable order (without lm_head)."""
    out = []
    for rule in NAME_TABLE:
        n = {None: 1, "encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}[rule.stack]
        for i in range(n):
            out.append(NameMapping(rule.hf.format(i=i), rule.ours.format(i=i), rule.hook))
    return out


# ------------------------------------------------------------------------------------------------- configs


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
        # transformers 5.x keeps this on the object; to_dict() may not include it.
        if hasattr(hf_config, "scale_decoder_outputs"):
            d["scale_decoder_outputs"] = hf_config.scale_decoder_outputs
        return d
    raise ValueError(f"HF config must be a dict or a transformers config, got {type(hf_config).__name__}")


def scale_decoder_outputs(hf_config: Any) -> bool:
    """Whether HF multiplies the decoder output by d_model**-0.5 before lm_head (see module docstring)."""
    d = _as_dict(hf_config)
    if "scale_decoder_outputs" in d:
        return bool(d["scale_decoder_outputs"])
    return d.get("tie_word_embeddings", True) is not False


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """Map an HF T5 config (dict or T5Config) to ModelConfig. Only T5.1.1 (gated-gelu) is supported."""
    d = _as_dict(hf_config)
    proj = d.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise ValueError(f"HF config feed_forward_proj={proj!r} is not supported: only T5.1.1 models "
                         "(feed_forward_proj='gated-gelu') can be converted")
    if d.get("model_type", "t5") not in ("t5", "mt5", "umt5"):
        raise ValueError(f"HF config model_type={d.get('model_type')!r} is not a T5 model")
    missing = [k for k in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"HF config is missing {missing}")
    fields = dict(
        vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), num_heads=int(d["num_heads"]),
        head_dim=int(d["d_kv"]), d_ff=int(d["d_ff"]), num_encoder_layers=int(d["num_layers"]),
        num_decoder_layers=int(d.get("num_decoder_layers") or d["num_layers"]),
        relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)), dtype="float32", param_dtype="float32",
        logits_via_embedding=False)
    for hf_key, ours in GQA_FIELDS.items():
        if d.get(hf_key) is not None and int(d[hf_key]) != fields["num_heads"]:
            fields[ours] = int(d[hf_key])
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_config(config: ModelConfig, expand_kv: bool = False) -> dict[str, Any]:
    """HF T5ForConditionalGeneration config.json contents for a model exported by `hf_from_params`."""
    d: dict[str, Any] = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.head_dim,
        "num_heads": config.num_heads, "d_ff": config.d_ff, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon, "dropout_rate": config.dropout_rate,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "tie_word_embeddings": False, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "initializer_factor": 1.0, "use_cache": True,
        "torch_dtype": "float32",
    }
    if not expand_kv:
        for hf_key, ours in GQA_FIELDS.items():
            g = getattr(config, ours)
            if g is not None and g != config.num_heads:
                d[hf_key] = g
    return d


# ------------------------------------------------------------------------------------------------- tensors


def to_numpy(x: Any, dtype: Any = np.float32) -> Array:
    """numpy / jax / torch tensor -> numpy array of `dtype` (torch bf16 goes through float32)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _hf_shape(state_dict_like: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading its data where the mapping allows (our lazy safetensors readers)."""
    shape = getattr(state_dict_like, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(state_dict_like[name].shape)


def _read_transposed(state_dict_like: Mapping[str, Any], name: str, dtype: Any,
                     block_bytes: int = 16 << 20) -> Array:
    """A 2-D tensor transposed to a C-contiguous array. Readers with `read_rows` (our safetensors readers) fill it
    block by block, so the vocabulary-sized head costs one copy plus a block instead of two full copies."""
    read_rows = getattr(state_dict_like, "read_rows", None)
    if not callable(read_rows):
        return np.ascontiguousarray(to_numpy(state_dict_like[name], dtype).T)
    rows, cols = _hf_shape(state_dict_like, name)
    out = np.empty((cols, rows), dtype)
    step = max(1, block_bytes // max(1, cols * np.dtype(dtype).itemsize))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[:, start:stop] = to_numpy(read_rows(name, start, stop), dtype).T
    return out


def hf_param_loader(state_dict_like: Mapping[str, Any], hf_config: Any, dtype: Any = np.float32,
                    source: str = "HF checkpoint") -> tuple[ModelConfig, dict[str, tuple[int, ...]],
                                                            Callable[[str], Array]]:
    """Check HF T5.1.1 tensor names and shapes without reading any data; return (config, shapes, load).

    shapes: our flat name ('encoder/layers_0/attention/query/kernel') -> our shape, in HF name-table order.
    load(our name): reads that one tensor and returns it in our layout as `dtype`.
    Raises ValueError naming the key on missing / unexpected keys or shape mismatches.
    """
    config = config_from_hf(hf_config)
    keys = set(state_dict_like.keys())
    mapping = name_map(config)
    expected = {m.hf for m in mapping} | {LM_HEAD}
    extra = sorted(keys - expected - set(TIED_ALIASES))
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r}"
                         f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''} for a T5.1.1 model with "
                         f"{config.num_encoder_layers}+{config.num_decoder_layers} layers")
    missing = [m.hf for m in mapping if m.hf not in keys]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    want = _expected_hf_shapes(config)
    head_name = LM_HEAD if LM_HEAD in keys else "shared.weight"
    want[head_name] = (config.vocab_size, config.d_model)
    for name in [m.hf for m in mapping] + [head_name]:
        got = _hf_shape(state_dict_like, name)
        if got != want[name]:
            raise ValueError(f"{source}: {name} has shape {got}, expected {want[name]} from the config")
    by_ours = {m.ours: m for m in mapping}
    ours_shapes = {m.ours: (tuple(reversed(want[m.hf])) if m.hook != "identity" else want[m.hf]) for m in mapping}
    ours_shapes[LOGITS_KERNEL] = (config.d_model, config.vocab_size)
    scale = config.d_model ** -0.5 if scale_decoder_outputs(hf_config) else 1.0

    def load(name: str) -> Array:
        if name == LOGITS_KERNEL:
            kernel = _read_transposed(state_dict_like, head_name, dtype)
            if scale != 1.0:
                # Folding HF's pre-lm_head scale into the kernel keeps one untied architecture for every import
                # (in place: the vocab-sized kernel is the largest tensor, so no third copy).
                kernel *= np.asarray(scale, dtype)
            return kernel
        m = by_ours[name]
        return HOOKS[m.hook][0](to_numpy(state_dict_like[m.hf], dtype))

    return config, ours_shapes, load


def params_from_hf(state_dict_like: Mapping[str, Any], hf_config: Any, dtype: Any = np.float32,
                   progress: Callable[[Iterator], Iterator] | None = None,
                   source: str = "HF checkpoint") -> tuple[ModelConfig, dict[str, Any]]:
    """HF T5.1.1 tensors -> (ModelConfig, nested params with our names), everything in memory.

    Args:
      state_dict_like: name -> tensor (numpy, torch or lazy; looked up one name at a time).
      hf_config: HF config dict or T5Config.
      progress: optional wrapper over the iteration (e.g. tqdm).
    Raises ValueError naming the key on missing / unexpected keys or shape mismatches.
    """
    from flax import traverse_util
    config, shapes, load = hf_param_loader(state_dict_like, hf_config, dtype, source)
    names = list(shapes)
    return config, traverse_util.unflatten_dict({n: load(n) for n in (progress(names) if progress else names)},
                                                sep="/")


def _expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes for a config (K/V of the config's kv-head width)."""
    from gqa_uptrain.checkpoint import expected_shapes
    ours = expected_shapes(config)
    out = {}
    for m in name_map(config):
        s = ours[m.ours]
        out[m.hf] = tuple(reversed(s)) if m.hook in ("linear", "relpos") else s
    return out


def _repeat_kv(kernel: Array, num_heads: int, num_kv_heads: int, head_dim: int) -> Array:
    """[embed, G*D] -> [embed, H*D], query head i reading KV head i // (H/G)."""
    e = kernel.shape[0]
    return np.repeat(kernel.reshape(e, num_kv_heads, head_dim), num_heads // num_kv_heads, axis=1).reshape(e, -1)


def iter_hf_tensors(params: Any, config: ModelConfig, expand_kv: bool = False,
                    dtype: Any = np.float32) -> Iterator[tuple[str, Array]]:
    """Yield (HF name, HF-layout array) one tensor at a time (so an exporter can stream them to disk).

    With `expand_kv` GQA K/V kernels are repeated to num_heads heads so stock HF T5 can load the result.
    """
    from gqa_uptrain.trees import flat_params
    flat = flat_params(params)
    for m in name_map(config):
        w = np.asarray(flat[m.ours], dtype)
        if expand_kv and m.ours.endswith(("/key/kernel", "/value/kernel")):
            kv = w.shape[1] // config.head_dim
            if kv != config.num_heads:
                w = _repeat_kv(w, config.num_heads, kv, config.head_dim)
        yield m.hf, HOOKS[m.hook][1](w)
    if config.logits_via_embedding:
        # Our tied head computes embedding(x) / sqrt(d_model); HF's untied lm_head has no scale.
        emb = np.asarray(flat["token_embedder/embedding"], dtype)
        yield LM_HEAD, np.ascontiguousarray(emb * np.asarray(config.d_model ** -0.5, dtype))
    else:
        yield LM_HEAD, HOOKS["linear"][1](np.asarray(flat[LOGITS_KERNEL], dtype))


def hf_from_params(params: Any, config: ModelConfig, expand_kv: bool = False) -> dict[str, Array]:
    """Our params (nested or flat 'a/b' dict) -> {HF T5 name: array [HF layout]}, untied lm_head included."""
    return dict(iter_hf_tensors(params, config, expand_kv))
