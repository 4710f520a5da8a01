"""Checkpoint readers for the converter: Hugging Face T5.1.1, T5X native and our own directories.

All readers stream: `open_source` checks names and shapes from headers / metadata alone and returns a lazy flat
name -> tensor mapping (`TensorSource`) in our layout; each tensor is read from disk only when it is looked up, so
the converter can read, convert and write one tensor at a time. The exception is T5X inline msgpack arrays, which
msgpack can only decode as a whole file (T5X writes large checkpoints with tensorstore, which is read lazily).

Formats (`detect_format`):
  hf     DIR/config.json (HF T5) + DIR/model.safetensors | DIR/model.safetensors.index.json (sharded)
         | DIR/pytorch_model.bin (pickle; only with torch installed, loaded with weights_only=True)
  t5x    .../checkpoint_N/checkpoint (flax msgpack; `target`/`state` or old `optimizer/target`/`optimizer/state`
         layout; arrays inline or as tensorstore directories beside the file), or a T5X model dir holding
         checkpoint_N/ subdirectories (the latest step is read)
  orbax  our converted dir or training MODEL_DIR (`gqa_uptrain.checkpoint.open_params`, orbax partial restore)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterator, KeysView, Mapping, Protocol, runtime_checkable

import numpy as np

from gqa_uptrain import hf as hf_names
from gqa_uptrain.checkpoint import OptimizerMoments, TensorSource, resolve_inside
from gqa_uptrain.config import ModelConfig

FORMATS = ("auto", "hf", "t5x", "orbax")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


@runtime_checkable
class TensorReader(Protocol):
    """What every checkpoint reader here is: a lazy, read-only name -> numpy array mapping.

    Names and each tensor's shape and dtype come from headers / metadata without reading data; `reader[name]`
    reads that one tensor from disk. Implemented by `SafetensorsFile`, `ShardedSafetensors`, `TorchBinTensors` (HF),
    `T5XTensors` (T5X, in T5X's names and layout) and `checkpoint.TensorSource` (ours, and every `Source.tensors`:
    our names and layout, float32)."""

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def __contains__(self, name: object) -> bool: ...

    def keys(self) -> KeysView[str]: ...

    def __getitem__(self, name: str) -> np.ndarray: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...


@dataclasses.dataclass
class Source:
    """A source checkpoint opened lazily in our layout (`tensors`: flat names, float32 numpy on lookup)."""

    config: ModelConfig
    tensors: TensorReader
    format: str
    path: str
    step: int | None = None
    files: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load_all(self, progress: Callable[[Iterator], Iterator] | None = None) -> dict[str, np.ndarray]:
        """Every tensor in memory (flat dict); needed by methods that run the source model (calibration)."""
        names = list(self.tensors)
        return {n: self.tensors[n] for n in (progress(names) if progress else names)}


class SafetensorsFile(Mapping):
    """Lazy read-only mapping over one .safetensors file; each lookup reads exactly one tensor from disk.

    Parsing and validation are the `safetensors` library's (header size, overlapping / out-of-range offsets, dtype
    codes, `__metadata__` type); bfloat16 comes back as ml_dtypes.bfloat16 through framework="np". The file is
    opened (memory-mapped) for each read and closed after it: a mapping kept open would count every page read so
    far in the process's resident memory (measured: peak RSS 1,073 MiB instead of 222 MiB reading a 944 MiB file
    tensor by tensor), and the converter's memory bound is one tensor, not the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        with self._open() as f:
            self.metadata = f.metadata() or {}
            self._names = list(f.keys())
            slices = {n: f.get_slice(n) for n in self._names}
            self._shapes = {n: tuple(sl.get_shape()) for n, sl in slices.items()}
            self._dtypes = {n: _safetensors_dtype(sl.get_dtype(), self.path, n) for n, sl in slices.items()}

    @contextlib.contextmanager
    def _open(self, what: str = ""):
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), framework="np") as f:
                yield f
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} not found") from None
        except Exception as e:  # SafetensorError, and OSError for unreadable files
            if what:
                raise ValueError(f"{self.path}: cannot read {what} ({_first_line(e)})") from None
            raise ValueError(f"{self.path}: not a valid safetensors file ({_first_line(e)})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        with self._open(f"tensor {name!r}") as f:
            return f.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (along its first axis), reading only those bytes."""
        with self._open(f"rows {start}:{stop} of {name!r}") as f:
            return f.get_slice(name)[start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._shapes  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _safetensors_dtype(code: str, path: pathlib.Path, name: str) -> np.dtype:
    """A safetensors header dtype code ('F32', 'BF16', ...) as the numpy dtype `get_tensor` returns."""
    import ml_dtypes
    codes = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
             "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "F32": np.float32,
             "F64": np.float64, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2}
    if code not in codes:
        raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which numpy cannot hold")
    return np.dtype(codes[code])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ShardedSafetensors(Mapping):
    """Lazy mapping over `model.safetensors.index.json` and its shards."""

    def __init__(self, index_path: str | os.PathLike, root: str | os.PathLike | None = None):
        self.index_path = pathlib.Path(index_path)
        self.root = pathlib.Path(root) if root is not None else self.index_path.parent
        try:
            index = json.loads(self.index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.index_path}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            bad = (type(weight_map).__name__ if not isinstance(weight_map, dict) else
                   next(f"{k!r}: {v!r}" for k, v in weight_map.items() if not (isinstance(k, str)
                                                                              and isinstance(v, str))))
            raise ValueError(f"{self.index_path}: 'weight_map' must map tensor names to shard file names (strings), "
                             f"got {bad[:80]}")
        self._where = dict(weight_map)
        self._shards: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(self._where.values())):
            # Shard names come from the index file: never let one point outside the checkpoint directory.
            path = resolve_inside(self.root, shard, f"{self.index_path}: shard", base=self.index_path.parent)
            if not path.exists():
                raise FileNotFoundError(f"{self.index_path}: shard {shard} not found")
            self._shards[shard] = SafetensorsFile(path)
            for name in (n for n, s in self._where.items() if s == shard):
                if name not in self._shards[shard]:
                    raise ValueError(f"{self.index_path}: tensor {name!r} is not in shard {shard}")

    @property
    def files(self) -> list[pathlib.Path]:
        return [self.index_path] + [s.path for s in self._shards.values()]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._shards[self._where[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shards[self._where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._shards[self._where[name]].dtype(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._shards[self._where[name]].read_rows(name, start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class TorchBinTensors(Mapping):
    """pytorch_model.bin (pickle) through torch.load(weights_only=True, mmap=True), refused without torch. The
    tensors stay memory-mapped; a lookup converts one to numpy (bfloat16 as ml_dtypes.bfloat16)."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is a pickle checkpoint; refusing to read it without torch (install the 'hf' "
                             "extra, or convert it to safetensors)") from None
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt files
            raise ValueError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
        if not isinstance(self._tensors, Mapping):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(self._tensors).__name__}")

    def __getitem__(self, name: str) -> np.ndarray:
        import torch
        t = self._tensors[name].detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        import ml_dtypes
        import torch
        t = self._tensors[name]
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(
            torch.empty((), dtype=t.dtype).numpy().dtype)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _hf_root(directory: pathlib.Path) -> pathlib.Path:
    """The directory whose files an HF checkpoint may read: itself, or for a Hugging Face hub cache snapshot
    (models--org--name/snapshots/<rev>/, whose files are symlinks into ../../blobs/) the cached repository."""
    d = directory.absolute()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def open_hf(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict[str, Any], list[pathlib.Path]]:
    """An HF model dir (or a .safetensors file with config.json beside it) -> (lazy tensors, config, files)."""
    path = pathlib.Path(path)
    directory = path.parent if path.is_file() else path
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: an HF checkpoint needs its config.json")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    root = _hf_root(directory)
    if path.is_file():
        if path.suffix == ".bin":
            return TorchBinTensors(path), hf_config, [cfg_path, path]
        if path.name.endswith(".index.json"):
            sharded = ShardedSafetensors(path, root)
            return sharded, hf_config, [cfg_path, *sharded.files]
        return SafetensorsFile(path), hf_config, [cfg_path, path]
    if (directory / SAFETENSORS).exists():
        return SafetensorsFile(directory / SAFETENSORS), hf_config, [cfg_path, directory / SAFETENSORS]
    if (directory / SAFETENSORS_INDEX).exists():
        sharded = ShardedSafetensors(directory / SAFETENSORS_INDEX, root)
        return sharded, hf_config, [cfg_path, *sharded.files]
    if (directory / TORCH_BIN).exists():
        return TorchBinTensors(directory / TORCH_BIN), hf_config, [cfg_path, directory / TORCH_BIN]
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


# ---------------------------------------------------------------------------------------------- T5X


_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")


def find_t5x_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """checkpoint file, checkpoint_N dir, or a model dir with checkpoint_N/ subdirs (latest) -> the msgpack file."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    steps = sorted((int(m.group(1)), p) for p in path.glob("checkpoint_*")
                   if (m := _CKPT_DIR.match(p.name)) and (p / "checkpoint").is_file())
    if not steps:
        raise FileNotFoundError(f"{path}: no T5X 'checkpoint' file and no checkpoint_N/checkpoint below it")
    return steps[-1][1] / "checkpoint"


def _is_ts_spec(x: Any) -> bool:
    return isinstance(x, dict) and ("driver" in x or "kvstore" in x)


class T5XTensors(Mapping):
    """Lazy flat mapping 'encoder/layers_0/...' -> array over a T5X msgpack state (`target` subtree).

    Inline arrays were decoded by msgpack; tensorstore-backed ones are read on lookup from the directory beside
    the checkpoint file. Reads pop their entry so each array is dropped once it has been converted.
    """

    def __init__(self, target: dict[str, Any], ckpt_dir: pathlib.Path, prefix: str):
        flat = {}
        # Stop flattening at tensorstore specs (they are dicts too).
        def walk(node, path):
            if isinstance(node, dict) and not _is_ts_spec(node):
                for k, v in node.items():
                    walk(v, path + (k,))
            else:
                flat["/".join(path)] = node
        walk(target, ())
        self._flat = flat
        self._dir = ckpt_dir
        self._prefix = prefix
        self.ts_files: list[pathlib.Path] = []
        for name, v in flat.items():
            if _is_ts_spec(v):
                self.ts_files.append(self._ts_path(name, v))
            elif not isinstance(v, (np.ndarray, np.generic)) or v.dtype.kind in "USOb":  # bfloat16 is kind 'V'
                # Checked here: a string "kernel" would otherwise fail later as a shape or dtype mystery.
                raise ValueError(f"{ckpt_dir}: T5X parameter {name!r} is a {type(v).__name__} "
                                 f"({str(v)[:40]!r}), not a numeric array or tensorstore spec")

    def _ts_path(self, name: str, spec: dict[str, Any]) -> pathlib.Path:
        kv = spec.get("kvstore", {})
        rel = kv.get("path") if isinstance(kv, dict) else None
        rel = rel or spec.get("path") or f"{self._prefix}.{name.replace('/', '.')}"
        if "://" in str(rel):
            raise ValueError(f"T5X parameter {name!r} points at {rel}; only local tensorstore files are supported "
                             "(copy the checkpoint locally first)")
        # The spec comes from the checkpoint file: it may only name data inside the checkpoint directory.
        return resolve_inside(self._dir, rel, f"T5X parameter {name!r}: tensorstore path")

    def shape(self, name: str) -> tuple[int, ...]:
        v = self._flat[name]
        if _is_ts_spec(v):
            return tuple(v.get("metadata", {}).get("shape", ())) or tuple(self._open_ts(name, v).shape)
        return tuple(np.shape(v))

    def dtype(self, name: str) -> np.dtype:
        v = self._flat[name]
        if _is_ts_spec(v):
            return np.dtype(self._open_ts(name, v).dtype.numpy_dtype)
        return np.asarray(v).dtype

    def _open_ts(self, name: str, spec: dict[str, Any]):
        import tensorstore as ts
        path = self._ts_path(name, spec)
        if not path.exists():
            raise FileNotFoundError(f"T5X parameter {name!r}: tensorstore data {path} not found")
        spec = dict(spec)
        spec.pop("path", None)
        spec["kvstore"] = {"driver": "file", "path": str(path)}
        try:
            return ts.open(spec, open=True, read=True).result()
        except Exception as e:  # tensorstore raises ValueError subclasses with long messages
            raise ValueError(f"T5X parameter {name!r}: cannot open tensorstore {path}: "
                             f"{str(e).splitlines()[0]}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._flat[name]
        if _is_ts_spec(v):
            return np.asarray(self._open_ts(name, v).read().result())
        return np.asarray(v)

    def release(self, name: str) -> None:
        self._flat[name] = None  # inline arrays: drop our reference after conversion

    def __contains__(self, name: object) -> bool:
        return name in self._flat

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)


def read_t5x_state(path: str | os.PathLike, optimizer: bool = False) -> tuple[T5XTensors, int | None, pathlib.Path]:
    """Open a T5X checkpoint: (lazy target tensors, step or None, msgpack file); with `optimizer`, the lazy
    tensors are the optimizer's per-parameter state (`state/param_states`: '<param>/v_row' ...) instead."""
    from flax import serialization
    ckpt = find_t5x_checkpoint(path)
    raw = ckpt.read_bytes()
    try:
        state = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several exception types on corrupt data
        raise ValueError(f"{ckpt}: not a valid T5X msgpack checkpoint ({type(e).__name__}: {e})") from None
    del raw
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt}: not a T5X checkpoint (top level is {type(state).__name__})")
    if "optimizer" in state and isinstance(state["optimizer"], dict) and "target" in state["optimizer"]:
        root, prefix = state["optimizer"], "optimizer.target"  # T5X before 2022 (flax.optim layout)
    elif "target" in state:
        root, prefix = state, "target"
    else:
        raise ValueError(f"{ckpt}: no 'target' or 'optimizer/target' in the checkpoint (keys {sorted(state)})")
    step = root.get("state", {}).get("step") if isinstance(root.get("state"), dict) else None
    if _is_ts_spec(step):
        step = None
    step = int(np.asarray(step)) if step is not None else None
    if optimizer:
        states = root.get("state", {}).get("param_states") if isinstance(root.get("state"), dict) else None
        if not isinstance(states, dict):
            raise ValueError(f"{ckpt}: no optimizer state (state/param_states) in this T5X checkpoint")
        return T5XTensors(states, ckpt.parent, prefix.replace("target", "state.param_states")), step, ckpt
    tensors = T5XTensors(root["target"], ckpt.parent, prefix)
    return tensors, step, ckpt


def read_t5x_moments(path: str | os.PathLike, config: ModelConfig) -> OptimizerMoments:
    """T5X Adafactor state (state/param_states/<param>/{v_row,v_col,v}, state/step) in our names.

    T5X factors 2-D parameters with the same rule as optax (its heuristic; logical factor rules fall back to it for
    rank <= 2), so the statistics carry over as stored. 3-D DenseGeneral kernels are factored by logical axis
    rules instead; their statistics are refused (one line naming the tensor)."""
    from gqa_uptrain.checkpoint import moments_from_fields, expected_shapes
    states, step, ckpt = read_t5x_state(path, optimizer=True)
    if step is None:
        raise ValueError(f"{ckpt}: the T5X optimizer state records no step (state/step)")
    shapes = expected_shapes(config)
    fields: dict[str, dict[str, np.ndarray]] = {"v_row": {}, "v_col": {}, "v": {}}
    for flat_name in states:
        name, _, field = flat_name.rpartition("/")
        if field in fields and name in shapes:
            arr = np.asarray(states[flat_name], np.float32)
            if _T5X_3D.search(name) and field != "v" and arr.ndim > 1:
                raise ValueError(f"{ckpt}: optimizer state {flat_name} has shape {arr.shape}: statistics of 3-D "
                                 "(DenseGeneral) attention kernels are not supported; convert without "
                                 "--carry-optimizer-state")
            fields[field][name] = _t5x_to_2d(name, arr) if field == "v" else arr
    return OptimizerMoments(int(step), moments_from_fields(fields, shapes, str(ckpt)))


def read_optimizer_moments(source: Source) -> OptimizerMoments:
    """The optimizer state of an opened source: our run dirs and converted dirs with carried state (orbax) and T5X
    checkpoints hold one; Hugging Face checkpoints hold parameters only (a one-line error says so)."""
    if source.format == "t5x":
        return read_t5x_moments(source.path, source.config)
    if source.format == "orbax":
        from gqa_uptrain.checkpoint import PARAMS_DIR, read_optimizer_moments as read_orbax
        # A run dir: the step whose parameters are converted; a converted dir holds one set (no step).
        return read_orbax(source.path, None if (pathlib.Path(source.path) / PARAMS_DIR).exists() else source.step)
    raise ValueError(f"{source.path}: {source.format} checkpoints hold no optimizer state; --carry-optimizer-state "
                     "needs a gqa_uptrain training run dir (or a dir converted with carried state) or a T5X "
                     "checkpoint")


_T5X_3D = re.compile(r"/(attention|self_attention|encoder_decoder_attention)/(query|key|value|out)/kernel$")


def _t5x_to_2d(name: str, arr: np.ndarray) -> np.ndarray:
    """T5X models with DenseGeneral keep [embed, heads, kv] / [heads, kv, embed]; our layout joins heads*kv."""
    if arr.ndim == 3 and _T5X_3D.search(name):
        return arr.reshape(arr.shape[0], -1) if not name.endswith("/out/kernel") else arr.reshape(-1, arr.shape[-1])
    return arr


def infer_t5x_config(shapes: Mapping[str, tuple[int, ...]], **overrides: Any) -> ModelConfig:
    """Architecture from parameter shapes (T5X stores no config); raise ValueError on inconsistencies."""
    def need(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ValueError(f"T5X checkpoint: missing parameter {name!r}; cannot infer the architecture")
        return shapes[name]

    if any(k.endswith("/mlp/wi/kernel") for k in shapes):
        raise ValueError("T5X checkpoint has mlp/wi/kernel (T5.1.0 ReLU MLP); only T5.1.1 gated-gelu "
                         "(mlp/wi_0, mlp/wi_1) is supported")
    vocab, d_model = need("token_embedder/embedding")
    heads, buckets = need("encoder/relpos_bias/rel_embedding")
    q_width = need("encoder/layers_0/attention/query/kernel")[1]
    if q_width % heads:
        raise ValueError(f"T5X checkpoint: encoder query width {q_width} is not a multiple of the {heads} heads "
                         "implied by encoder/relpos_bias/rel_embedding")
    head_dim = q_width // heads

    def kv(name: str) -> int | None:
        w = need(name)[1]
        if w % head_dim:
            raise ValueError(f"T5X checkpoint: {name} width {w} is not a multiple of head_dim {head_dim}")
        g = w // head_dim
        return None if g == heads else g

    n_enc = len({m.group(1) for k in shapes if (m := re.match(r"encoder/layers_(\d+)/", k))})
    n_dec = len({m.group(1) for k in shapes if (m := re.match(r"decoder/layers_(\d+)/", k))})
    fields = dict(
        vocab_size=vocab, d_model=d_model, num_heads=heads, head_dim=head_dim,
        d_ff=need("encoder/layers_0/mlp/wi_0/kernel")[1], num_encoder_layers=n_enc, num_decoder_layers=n_dec,
        encoder_kv_heads=kv("encoder/layers_0/attention/key/kernel"),
        decoder_self_kv_heads=kv("decoder/layers_0/self_attention/key/kernel"),
        decoder_cross_kv_heads=kv("decoder/layers_0/encoder_decoder_attention/key/kernel"),
        relative_attention_num_buckets=buckets, dtype="float32", param_dtype="float32",
        logits_via_embedding="decoder/logits_dense/kernel" not in shapes)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"T5X checkpoint: inconsistent shapes: {e}") from None


def read_t5x(path: str | os.PathLike, config: ModelConfig | None = None) -> Source:
    """Open a T5X checkpoint lazily in our layout. `config` (e.g. from --gin_file) replaces shape inference."""
    from gqa_uptrain.checkpoint import check_params_match_config
    tensors, step, ckpt = read_t5x_state(path)
    shapes = {}
    for name in tensors:
        s = tensors.shape(name)
        if _T5X_3D.search(name) and len(s) == 3:
            s = (s[0], s[1] * s[2]) if not name.endswith("/out/kernel") else (s[0] * s[1], s[2])
        shapes[name] = s
    config = config or infer_t5x_config(shapes)
    check_params_match_config(_ShapeTree.build(shapes), config, source=str(ckpt))

    def load(name: str) -> np.ndarray:
        arr = np.asarray(_t5x_to_2d(name, tensors[name]), np.float32)
        tensors.release(name)
        return arr

    files = [ckpt, *(f for d in tensors.ts_files for f in sorted(d.rglob("*")) if f.is_file())]
    for f in files[1:]:  # a symlink inside a tensorstore directory must not lead the hashing outside either
        resolve_inside(ckpt.parent, os.path.relpath(f, ckpt.parent), f"{ckpt}: tensorstore file")
    return Source(config, TensorSource(shapes, load), "t5x", str(ckpt), step, [str(f) for f in files])


class _ShapeTree:
    """Nested dict of shape-only stand-ins so shape checks run before any tensor is read."""

    @staticmethod
    def build(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        from flax import traverse_util
        return traverse_util.unflatten_dict({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()},
                                            sep="/")


# ---------------------------------------------------------------------------------------------- dispatch


def detect_format(path: str | os.PathLike) -> str:
    """'hf' | 't5x' | 'orbax' from the files present; ValueError naming the path otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.is_file():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            return "hf"
        if path.name == "checkpoint":
            return "t5x"
        raise ValueError(f"cannot tell the format of {path}; pass --source-format")
    cfg = path / "config.json"
    if cfg.exists():
        try:
            d = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg} is not valid JSON: {e}") from None
        if "num_encoder_layers" in d:
            return "orbax"
        if "d_kv" in d or d.get("model_type") in ("t5", "mt5", "umt5"):
            return "hf"
    if (path / "checkpoint").is_file() or any(_CKPT_DIR.match(p.name) for p in path.glob("checkpoint_*")):
        return "t5x"
    raise ValueError(f"cannot tell the format of {path}: expected an HF dir (config.json + model.safetensors), "
                     "a T5X checkpoint_N dir or a gqa_uptrain checkpoint; pass --source-format")


def open_source(path: str | os.PathLike, fmt: str = "auto", config: ModelConfig | None = None) -> Source:
    """Open any supported source lazily in our layout (float32 numpy on lookup), names and shapes checked.

    `config` overrides T5X shape inference."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; choose one of {FORMATS}")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "hf":
        tensors, hf_config, files = open_hf(path)
        cfg, shapes, load = hf_names.hf_param_loader(tensors, hf_config, source=str(path))
        if config is not None and config != cfg:
            raise ValueError(f"{path}: --gin_file config differs from the HF config.json; HF sources take their "
                             "architecture from config.json")
        return Source(cfg, TensorSource(shapes, load), "hf", str(path), None, [str(f) for f in files],
                      {"hf_scale_decoder_outputs": hf_names.scale_decoder_outputs(hf_config)})
    if fmt == "t5x":
        return read_t5x(path, config)
    from gqa_uptrain.checkpoint import open_params
    opened = open_params(path)
    files = sorted(str(p) for p in pathlib.Path(path).rglob("*") if p.is_file())
    return Source(opened.config, opened.params, "orbax", str(path), opened.step, files,
                  {"source_metadata": opened.manifest.to_dict() if opened.manifest else {}})


def sha256_files(files: list[str], root: str | None = None) -> dict[str, str]:
    """sha256 of each file, read in 16 MiB chunks (constant memory)."""
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[os.path.relpath(f, root) if root else f] = h.hexdigest()
    return out
