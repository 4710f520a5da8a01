"""gin at the edge: parsing --gin_file / --gin.NAME=value the T5X way and building typed configs from bindings.

Library code never reads gin; the CLI calls `parse_gin` once and then `model_config_from_gin()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
from typing import Sequence

import gin

from gqa_uptrain.config import ModelConfig

REPO_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

_REGISTERED: dict[str, object] = {}


def configurable_dataclass(cls: type, name: str | None = None):
    """Register a (gin-free) dataclass with gin once and return the gin-wrapped constructor."""
    name = name or cls.__name__
    if name not in _REGISTERED:
        _REGISTERED[name] = gin.external_configurable(cls, name=name)
    return _REGISTERED[name]


def build_dataclass(cls: type, name: str | None = None):
    """Instantiate `cls` from the current gin bindings as a plain instance (lists become tuples)."""
    bound = configurable_dataclass(cls, name)()
    values = {f.name: getattr(bound, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Registered at import: gin files refer to `ModelConfig.*`.
configurable_dataclass(ModelConfig)

_GIN_FLAG = re.compile(r"^--gin\.([A-Za-z_][\w.]*(?:/[\w.]+)*)=(.*)$", re.S)


def split_gin_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull `--gin.NAME=value` flags out of argv -> (remaining argv, ['NAME = value', ...])."""
    rest, bindings = [], []
    for arg in argv:
        m = _GIN_FLAG.match(arg)
        if m:
            bindings.append(f"{m.group(1)} = {m.group(2)}")
        elif arg.startswith("--gin.") and "=" not in arg:
            raise SystemExit(f"error: {arg!r} needs a value: --gin.NAME=VALUE")
        else:
            rest.append(arg)
    return rest, bindings


def _parse_binding(binding: str) -> None:
    try:
        gin.parse_config(binding)
    except Exception:  # noqa: BLE001 - retry as a plain string, e.g. --gin.MODEL_DIR=/tmp/run
        name, _, value = binding.partition(" = ")
        try:
            gin.parse_config(f"{name} = {value!r}")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"bad gin binding {binding!r}: {e}") from None


@contextlib.contextmanager
def _plain_file_search():
    """Search gin files on the filesystem only. gin also registers a python-resource reader that logs an ERROR for
    every search path that misses and crashes on namespace packages (e.g. a `configs/` dir on sys.path)."""
    import gin.config as gin_config
    saved = list(gin_config._FILE_READERS)
    gin_config._FILE_READERS[:] = saved[:1]  # (open, os.path.isfile)
    try:
        yield
    finally:
        gin_config._FILE_READERS[:] = saved


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Clear gin, then load files (searched in `search_paths`, the repo's configs/ and cwd) and bindings."""
    gin.clear_config()
    # configs/ and the repo root: both 'models/t5_1_1/xxl.gin' and 'configs/models/t5_1_1/xxl.gin' resolve anywhere.
    dirs = [*search_paths, str(REPO_CONFIG_DIR), str(REPO_CONFIG_DIR.parent), "."]
    for p in dirs:
        gin.add_config_file_search_path(p)
    with _plain_file_search():
        _parse_files_and_bindings(gin_files, bindings, dirs)


def _parse_files_and_bindings(gin_files: Sequence[str], bindings: Sequence[str], dirs: Sequence[str]) -> None:
    for f in gin_files:
        if not any((pathlib.Path(d) / f).exists() for d in dirs):
            raise FileNotFoundError(f"gin file {f!r} not found (looked in {', '.join(dirs)})")
        try:
            gin.parse_config_file(f)
        except Exception as e:  # noqa: BLE001 - gin's messages are good; add the file name
            raise ValueError(f"error in gin file {f}: {e}") from None
    for b in bindings:
        _parse_binding(b)


def model_config_from_gin() -> ModelConfig:
    """Build the plain (non-gin) ModelConfig from the current bindings."""
    return build_dataclass(ModelConfig)


def model_config_to_gin(config: ModelConfig) -> str:
    """A self-contained gin file reproducing `config` (written next to checkpoints)."""
    lines = ["# Resolved model configuration (written by gqa_uptrain)."]
    for f in dataclasses.fields(ModelConfig):
        lines.append(f"ModelConfig.{f.name} = {getattr(config, f.name)!r}")
    return "\n".join(lines) + "\n"
