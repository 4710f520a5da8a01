"""Export our checkpoints to Hugging Face T5 (safetensors + `config.json`), in HF's sharded layout.

Tensors are read from our checkpoint one at a time (orbax partial restore), converted to the HF layout and
collected into shards of at most `max_shard_bytes`; each full shard is written with `safetensors.numpy.save_file`
and dropped before the next is read, so exporting holds at most one shard (plus the tensor being added), never the
whole model. One shard is written as `model.safetensors`; more as `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` (HF's `save_pretrained` layout, which `from_pretrained` and our readers load).
Names and layouts come from `gqa_uptrain.hf`.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable, Iterable, Iterator

import numpy as np

from gqa_uptrain import hf
from gqa_uptrain.config import ModelConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_MIB = 256


def plan_shards(specs: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in order) into consecutive shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own), as HF's `split_torch_state_dict_into_shards` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_sharded_safetensors(directory: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                              tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                              metadata: dict[str, str] | None = None,
                              progress: Callable[[Iterator], Iterator] | None = None) -> list[str]:
    """Write `tensors` (streamed in the order of `specs`) as safetensors shards + index into `directory`.

    Returns the file names written. Raises ValueError if a tensor's name/shape/dtype differs from its spec."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    if max_shard_bytes < 1:
        raise ValueError(f"--max-shard-mib must be > 0, got {max_shard_bytes / 2 ** 20:g}")
    plan = plan_shards(specs, max_shard_bytes)
    files = shard_file_names(len(plan))
    spec_of = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype in specs}
    it = iter(tensors)
    if progress is not None:
        it = progress(it)
    weight_map: dict[str, str] = {}
    total = 0
    for names, fname in zip(plan, files):
        shard: dict[str, np.ndarray] = {}
        for want in names:
            got = next(it, None)
            if got is None:
                raise ValueError(f"safetensors writer: stream ended before {want}")
            got_name, arr = got
            arr = np.ascontiguousarray(arr)
            shape, dtype = spec_of[want]
            if got_name != want or tuple(arr.shape) != shape or arr.dtype != dtype:
                raise ValueError(f"safetensors writer: got {got_name} {arr.shape} {arr.dtype}, expected "
                                 f"{want} {shape} {dtype}")
            shard[want] = arr
            weight_map[want] = fname
            total += arr.nbytes
        save_file(shard, str(directory / fname), metadata=metadata or {"format": "pt"})
        del shard
    if next(it, None) is not None:
        raise ValueError("safetensors writer: more tensors than specs")
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files = files + [SAFETENSORS_INDEX]
    return files


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
              expand_kv: bool = False, step: int | None = None, show_progress: bool = False,
              max_shard_mib: float = DEFAULT_MAX_SHARD_MIB, allow_nonfinite: bool = False) -> pathlib.Path:
    """Our checkpoint dir (converted dir or MODEL_DIR) -> HF dir (safetensors shards + config.json), atomically.

    Non-finite (NaN/Inf) parameters are refused unless `allow_nonfinite`."""
    from gqa_uptrain.checkpoint import atomic_directory, check_disjoint, checked_finite, open_params
    out = pathlib.Path(output)
    check_disjoint(checkpoint, out, "--checkpoint", "--output")  # --overwrite must never delete the source
    if out.exists() and not overwrite:  # fail before the (slow) load
        raise FileExistsError(f"output {out.absolute()} already exists (pass --overwrite to replace it)")
    if not (max_shard_mib > 0):
        raise ValueError(f"--max-shard-mib must be > 0, got {max_shard_mib}")
    loaded = open_params(checkpoint, step)  # lazy: read, convert and write one tensor at a time
    config = loaded.config
    params = checked_finite(loaded.params, str(checkpoint), allow_nonfinite)
    progress = None
    if show_progress:
        from tqdm import tqdm
        progress = lambda it: tqdm(it, total=len(hf.name_map(config)) + 1, desc="export", unit="tensor")  # noqa: E731
    with atomic_directory(out, overwrite) as tmp:
        write_sharded_safetensors(tmp, hf_specs(config, expand_kv), hf.iter_hf_tensors(params, config, expand_kv),
                                  int(max_shard_mib * 2 ** 20), progress=progress)
        conf = hf.hf_config_from_config(config, expand_kv)
        conf["gqa_uptrain"] = {"source": str(pathlib.Path(checkpoint).absolute()), "step": loaded.step,
                               "expand_kv": expand_kv}
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return out
