"""Export our checkpoints to Hugging Face T5 (`model.safetensors` + `config.json`), streaming.

Each tensor is read from our checkpoint (orbax partial restore), converted to the HF layout and written to the
safetensors file (whose header is computed from shapes first) before the next one is read, so exporting never
holds the model in memory. Names and layouts come from `gqa_uptrain.hf`.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gqa_uptrain import hf
from gqa_uptrain.config import ModelConfig

_DTYPE_CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
                np.dtype("int32"): "I32", np.dtype("int64"): "I64"}


def _code(dtype: np.dtype) -> str:
    if dtype.name == "bfloat16":
        return "BF16"
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"cannot write dtype {dtype} to safetensors")
    return _DTYPE_CODES[dtype]


def write_safetensors(path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None,
                      progress: Callable[[Iterator], Iterator] | None = None) -> None:
    """Write a safetensors file from `specs` (name, shape, dtype), then stream `tensors` in the same order.

    Only the tensor being written is in memory. Raises ValueError if a tensor's name/shape/dtype differs from
    its spec.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _code(np.dtype(dtype)), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    it = iter(tensors)
    if progress is not None:
        it = progress(it)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), (got_name, arr) in zip(specs, it, strict=True):
            arr = np.ascontiguousarray(arr)
            if got_name != name or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"safetensors writer: got {got_name} {arr.shape} {arr.dtype}, expected "
                                 f"{name} {tuple(shape)} {np.dtype(dtype)}")
            f.write(arr.tobytes())


def hf_specs(config: ModelConfig, expand_kv: bool = False) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(HF name, HF shape, float32) for every tensor `hf.iter_hf_tensors` yields, in the same order."""
    from gqa_uptrain.checkpoint import expected_shapes
    ours = expected_shapes(config)
    out = []
    for m in hf.name_map(config):
        s = ours[m.ours]
        if expand_kv and m.ours.endswith(("/key/kernel", "/value/kernel")):
            s = (s[0], config.num_heads * config.head_dim)
        out.append((m.hf, tuple(reversed(s)) if m.hook != "identity" else s, np.dtype(np.float32)))
    out.append((hf.LM_HEAD, (config.vocab_size, config.d_model), np.dtype(np.float32)))
    return out


def export_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
              expand_kv: bool = False, step: int | None = None, show_progress: bool = False) -> pathlib.Path:
    """Our checkpoint dir (converted dir or MODEL_DIR) -> HF dir with model.safetensors + config.json, atomically."""
    from gqa_uptrain.checkpoint import atomic_directory, open_params
    out = pathlib.Path(output)
    if out.exists() and not overwrite:  # fail before the (slow) load
        raise FileExistsError(f"output {out.absolute()} already exists (pass --overwrite to replace it)")
    loaded = open_params(checkpoint, step)  # lazy: read, convert and write one tensor at a time
    config = loaded.config
    progress = None
    if show_progress:
        from tqdm import tqdm
        progress = lambda it: tqdm(it, total=len(hf.name_map(config)) + 1, desc="export", unit="tensor")  # noqa: E731
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", hf_specs(config, expand_kv),
                          hf.iter_hf_tensors(loaded.params, config, expand_kv), progress=progress)
        conf = hf.hf_config_from_config(config, expand_kv)
        conf["gqa_uptrain"] = {"source": str(pathlib.Path(checkpoint).absolute()), "step": loaded.step,
                               "expand_kv": expand_kv}
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return out
