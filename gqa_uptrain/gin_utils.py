"""gin at the edge: parsing --gin_file / --gin.NAME=value the T5X way and building typed configs from bindings.

Library code never reads gin; a command adds the gin flags (`add_gin_arguments`), calls `load_gin` once and then
`model_config_from_gin()` (or `model_config` for both, or `resolve_model_config` for a training run).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
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


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
              command_macros: Sequence[str] = ()) -> None:
    """Clear gin, then load files (searched in `search_paths`, the repo's configs/ and cwd) and bindings.

    `command_macros`: macros the calling command reads itself (gin.query_parameter), known even when no file does."""
    gin.clear_config()
    # configs/ and the repo root: both 'models/t5_1_1/xxl.gin' and 'configs/models/t5_1_1/xxl.gin' resolve anywhere.
    dirs = [*search_paths, str(REPO_CONFIG_DIR), str(REPO_CONFIG_DIR.parent), "."]
    for p in dirs:
        gin.add_config_file_search_path(p)
    with _plain_file_search():
        _parse_files_and_bindings(gin_files, bindings, dirs, command_macros)


def _parse_files_and_bindings(gin_files: Sequence[str], bindings: Sequence[str], dirs: Sequence[str],
                              command_macros: Sequence[str] = ()) -> None:
    for f in gin_files:
        if not any((pathlib.Path(d) / f).exists() for d in dirs):
            raise FileNotFoundError(f"gin file {f!r} not found (looked in {', '.join(dirs)})")
        try:
            gin.parse_config_file(f)
        except Exception as e:  # noqa: BLE001 - gin's messages are good; add the file name
            raise ValueError(f"error in gin file {f}: {e}") from None
    # gin accepts a binding of a macro nobody reads, and our string fallback turns any unparseable value into a
    # string: both silently run something other than what was asked. Check names and types against the files.
    known_macros = _macro_names() | set(command_macros)
    problems = []
    for b in bindings:
        name = b.partition(" = ")[0].strip()
        problem = _unknown_target(name, known_macros)
        if problem:
            problems.append(problem)
            continue
        try:
            _parse_binding(b)
        except ValueError as e:
            problems.append(str(e).splitlines()[0])
            continue
        problems.extend(_type_problems(name))
    if problems:
        raise GinBindingError("; ".join(problems))


class GinBindingError(ValueError):
    """A --gin.NAME=VALUE override that names nothing the config reads, or has a value of the wrong type."""


def _macro_names() -> set[str]:
    """Macros the parsed files define or read (`NAME = ...` or `%NAME`)."""
    from gin import config as gin_config
    names = set()
    for (scope, selector), params in gin_config._CONFIG.items():
        if selector == "gin.macro":
            names.add(scope)
        for value in params.values():
            names.update(ref.scoped_selector.rpartition("/")[0] for ref in _macro_refs(value))
    return names


def _macro_refs(value):
    """The `%MACRO` references in a bound value (also inside lists, tuples and dicts)."""
    from gin import config as gin_config
    if isinstance(value, gin_config.ConfigurableReference):
        if value.configurable.name == "macro":
            yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _macro_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _macro_refs(v)


def _did_you_mean(name: str, known) -> str:
    import difflib
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"{hint}known: {', '.join(sorted(known))}"


def _unknown_target(name: str, known_macros: set[str]) -> str | None:
    """Why binding `name` would be ignored or refused, or None when it names a macro or parameter gin reads."""
    from gin import config as gin_config
    if "." not in name:  # a macro (scoped macros `scope/NAME` are left to gin)
        if "/" in name or name in known_macros:
            return None
        return f"unknown gin macro {name} ({_did_you_mean(name, known_macros)})"
    target, _, param = name.rpartition("/")[2].rpartition(".")
    configurable = gin_config._REGISTRY.get_match(target)
    if configurable is None:
        names = {c.name for _, c in gin_config._REGISTRY.items() if not c.selector.startswith("gin.")}
        return f"unknown gin configurable {target} in {name} ({_did_you_mean(target, names)})"
    params = _parameter_types(configurable)
    if params is not None and param not in params:
        return f"{configurable.name} has no parameter {param} ({_did_you_mean(param, params)})"
    return None


def _parameter_types(configurable) -> dict[str, object] | None:
    """Declared parameter types of a registered dataclass (what every configurable here is), else None."""
    import typing
    cls = configurable.wrapped
    if not dataclasses.is_dataclass(cls):
        return None
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no type check, names still checked
        hints = {}
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def _consumers(macro: str) -> list[tuple[str, object]]:
    """(Configurable.param, declared type) of every parameter that reads `macro`, directly or via other macros."""
    from gin import config as gin_config
    out, todo, seen = [], [macro], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for (scope, selector), params in gin_config._CONFIG.items():
            for param, value in params.items():
                if not any(ref.scoped_selector.rpartition("/")[0] == m for ref in _macro_refs(value)):
                    continue
                if selector == "gin.macro":
                    todo.append(scope)
                    continue
                configurable = gin_config._REGISTRY.get_match(selector)
                types = _parameter_types(configurable) if configurable else None
                if types and types.get(param) is not None:
                    out.append((f"{configurable.name}.{param}", types[param]))
    return out


def _type_problems(name: str) -> list[str]:
    """The bound value of `name` against the types of the parameters that read it."""
    from gin import config as gin_config
    if "." in name:
        target, _, param = name.rpartition("/")[2].rpartition(".")
        configurable = gin_config._REGISTRY.get_match(target)
        expected = [(_parameter_types(configurable) or {}).get(param)]
        value = gin.query_parameter(name)
    elif "/" in name:
        return []
    else:
        expected = [t for _, t in _consumers(name)]
        value = gin.query_parameter(f"%{name}")
    if isinstance(value, gin_config.ConfigurableReference):
        return []  # another macro or configurable: checked where it is bound
    for t in expected:
        if t is float and isinstance(value, str) and _non_finite(value):
            # gin has no literal for these, so they arrive as strings; name the real problem, not the type.
            return [f"{name} must be a finite number, got {value!r}"]
        if t is not None and not _value_matches(value, t):
            return [f"{name} expects {_type_name(t)}, got {value!r}"]
    return []


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _value_matches(value, t) -> bool:
    import types
    import typing
    origin = typing.get_origin(t)
    if t is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_value_matches(value, a) for a in typing.get_args(t))
    if origin is typing.Literal:
        return value in typing.get_args(t)
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if origin in (tuple, list) or t in (tuple, list):
        return isinstance(value, (tuple, list))
    return True  # nested configs and other types: gin / the dataclass check them


def _type_name(t) -> str:
    import types
    import typing
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if t is type(None):
        return "None"
    name = getattr(t, "__name__", str(t))
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def model_config_from_gin() -> ModelConfig:
    """Build the plain (non-gin) ModelConfig from the current bindings."""
    return build_dataclass(ModelConfig)


def model_config_to_gin(config: ModelConfig) -> str:
    """A self-contained gin file reproducing `config` (written next to checkpoints)."""
    lines = ["# Resolved model configuration (written by gqa_uptrain)."]
    for f in dataclasses.fields(ModelConfig):
        lines.append(f"ModelConfig.{f.name} = {getattr(config, f.name)!r}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ commands' gin flags


def add_gin_arguments(parser: argparse.ArgumentParser, default_file: str | None = None) -> None:
    """--gin_file (repeatable) and --gin_search_paths; `load_gin` reads them (with the --gin.NAME=VALUE bindings
    the CLI split off into args.gin_bindings)."""
    parser.add_argument("--gin_file", action="append", default=None, metavar="FILE",
                        help="gin config file (repeatable), searched in ./ and configs/"
                             + (f"; default {default_file}" if default_file else ""))
    parser.add_argument("--gin_search_paths", action="append", default=[], metavar="DIR",
                        help="extra directories to search for gin files and includes")
    parser.set_defaults(_default_gin_file=default_file)


def load_gin(args: argparse.Namespace) -> None:
    """Parse the files and bindings a command's flags name (see `add_gin_arguments`)."""
    files = args.gin_file or ([args._default_gin_file] if args._default_gin_file else [])
    parse_gin(files, getattr(args, "gin_bindings", []), args.gin_search_paths, getattr(args, "_command_macros", ()))


def model_config(args: argparse.Namespace) -> ModelConfig:
    """`load_gin`, then the bound ModelConfig."""
    load_gin(args)
    return model_config_from_gin()


# Fields that may legitimately differ between a checkpoint and the run that continues it.
_RUNTIME_FIELDS = ("dropout_rate", "dtype", "param_dtype")


def resolve_model_config(model_dir: str | None, initial_checkpoint: str | None) -> ModelConfig:
    """The model config of a training run, after `load_gin`.

    Without a model gin file, the architecture comes from `model_dir` (when resuming) or `initial_checkpoint`, with
    DROPOUT_RATE / ACTIVATION_DTYPE macros applied when the run file sets them (finetune.gin does). With a model
    gin file, it must describe the same architecture as that checkpoint.
    """
    from gqa_uptrain import checkpoint
    source = None
    for d in (model_dir, initial_checkpoint):
        if d and (pathlib.Path(d) / checkpoint.CONFIG_FILE).exists():
            source = (d, checkpoint.read_config(d))
            break
    try:
        gin.query_parameter("ModelConfig.d_model")
        bound = True
    except ValueError:
        bound = False
    if bound:
        mcfg = model_config_from_gin()
        if source:
            d, scfg = source
            diff = [f.name for f in dataclasses.fields(scfg) if f.name not in _RUNTIME_FIELDS
                    and getattr(scfg, f.name) != getattr(mcfg, f.name)]
            if diff:
                k = diff[0]
                raise ValueError(f"{d}/config.json has {k}={getattr(scfg, k)!r} but the gin model config has "
                                 f"{getattr(mcfg, k)!r} (differing: {', '.join(diff)}); drop the model gin file "
                                 "to take the architecture from the checkpoint, or fix the override")
        return mcfg
    if source is None:
        raise ValueError("no model config: pass a model gin file (e.g. --gin_file=models/t5_1_1/tiny.gin) or an "
                         "INITIAL_CHECKPOINT / MODEL_DIR that has a config.json")
    mcfg = source[1]
    for macro, field in (("DROPOUT_RATE", "dropout_rate"), ("ACTIVATION_DTYPE", "dtype")):
        try:
            mcfg = mcfg.replace(**{field: gin.query_parameter(f"%{macro}")})
        except ValueError:
            pass
    return mcfg
