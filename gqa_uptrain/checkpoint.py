"""On-disk checkpoints: our own directories (orbax), with a self-describing manifest.

Layouts `load_params` understands:
  converted / exported model dir:   DIR/config.json, DIR/model.gin, DIR/manifest.json, DIR/params/ (orbax)
  training run dir (MODEL_DIR):     DIR/config.json, DIR/checkpoints/<step>/params/ (ocp.CheckpointManager item)
Writes go to a temporary sibling directory that is renamed into place when complete, so a crash or bad input
never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np

from gqa_uptrain.config import ModelConfig

CONFIG_FILE = "config.json"
GIN_FILE = "model.gin"
MANIFEST_FILE = "manifest.json"
PARAMS_DIR = "params"
TRAIN_CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass
class LoadedCheckpoint:
    config: ModelConfig
    params: Any  # nested dict of arrays, T5X names
    metadata: dict[str, Any]
    step: int | None = None


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output`, on error it is removed."""
    output = pathlib.Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            trash = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(trash)
            tmp.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config_files(directory: pathlib.Path, config: ModelConfig) -> None:
    from gqa_uptrain.gin_utils import model_config_to_gin  # gin only at the edge of writing files
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    (directory / GIN_FILE).write_text(model_config_to_gin(config))


def read_config(directory: str | os.PathLike) -> ModelConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a gqa_uptrain checkpoint directory")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save_params(output: str | os.PathLike, params: Any, config: ModelConfig, metadata: dict[str, Any] | None = None,
                overwrite: bool = False, extra_files: dict[str, str] | None = None) -> pathlib.Path:
    """Write params (orbax), config.json, model.gin and manifest.json atomically to `output`.

    extra_files: file name -> text written into the same directory inside the same atomic step."""
    import orbax.checkpoint as ocp
    check_params_match_config(params, config)
    with atomic_directory(output, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        write_config_files(tmp, config)
        (tmp / MANIFEST_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return pathlib.Path(output)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/kernel' -> shape for a config, without allocating."""
    from flax import traverse_util

    from gqa_uptrain.model import abstract_params
    import flax.linen as nn
    abstract = nn.meta.unbox(abstract_params(config))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}


def check_params_match_config(params: Any, config: ModelConfig, source: str = "params") -> None:
    """Raise one clear ValueError naming missing/extra keys or the first shape mismatch."""
    from flax import traverse_util
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = expected_shapes(config)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} parameter(s), first {missing[0]!r} "
                         f"(expected shape {want[missing[0]]})")
    if extra:
        raise ValueError(f"{source}: unexpected parameter(s) {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k in sorted(want):
        if got[k] != want[k]:
            raise ValueError(f"{source}: {k} has shape {got[k]}, expected {want[k]} for this config")


def _restore_args(config: ModelConfig):
    import flax.linen as nn
    import orbax.checkpoint as ocp
    from gqa_uptrain.model import abstract_params
    abstract = nn.meta.unbox(abstract_params(config))
    # Restore whole arrays onto this process's first device, whatever mesh a training run saved them with
    # (otherwise orbax refuses a checkpoint written under a different device topology).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return ocp.args.StandardRestore(abstract)


def load_params(directory: str | os.PathLike, step: int | None = None) -> LoadedCheckpoint:
    """Load params + config from a converted checkpoint dir or the latest (or given) step of a training run."""
    import orbax.checkpoint as ocp
    directory = pathlib.Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = read_config(directory)
    meta_path = directory / MANIFEST_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if (directory / PARAMS_DIR).exists():
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / PARAMS_DIR, _restore_args(config).item)
        return LoadedCheckpoint(config, params, metadata, metadata.get("step"))
    run_dir = directory / TRAIN_CHECKPOINTS_DIR
    if run_dir.exists():
        with ocp.CheckpointManager(run_dir, item_names=("params",)) as mngr:
            step = mngr.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"{run_dir} holds no complete checkpoint")
            restored = mngr.restore(step, args=ocp.args.Composite(params=_restore_args(config)))
        return LoadedCheckpoint(config, restored["params"], metadata, int(step))
    raise FileNotFoundError(f"{directory} has neither {PARAMS_DIR}/ nor {TRAIN_CHECKPOINTS_DIR}/: "
                            "not a gqa_uptrain checkpoint")


def tree_to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
