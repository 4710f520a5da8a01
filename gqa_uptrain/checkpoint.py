"""On-disk checkpoints: our own directories (orbax), with a self-describing manifest.

Layouts `load_params` / `open_params` understand:
  converted / exported model dir:   DIR/config.json, DIR/model.gin, DIR/manifest.json, DIR/params/ (orbax)
  training run dir (MODEL_DIR):     DIR/config.json, DIR/checkpoints/<step>/params/ (ocp.CheckpointManager item)
A converted dir written with `convert --carry-optimizer-state` also holds DIR/opt_state/ (orbax): Adafactor's
statistics per parameter, flat names 'v_row/<param>', 'v_col/<param>' (factored) or 'v/<param>', and its manifest
records `optimizer_state: "adafactor"` and `optimizer_step` (`read_optimizer_moments`, `restore_carried_opt_state`).
DIR/params/ is written by `ParamsWriter` as an orbax checkpoint built from partial saves (the pytree lives in
DIR/params/state/); directories written by earlier versions hold the pytree directly in DIR/params/. Both load.
Writes go to a temporary sibling directory that is renamed into place when complete, so a crash or bad input
never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from gqa_uptrain import native_stderr
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.trees import flat_params

CONFIG_FILE = "config.json"
GIN_FILE = "model.gin"
MANIFEST_FILE = "manifest.json"
PARAMS_DIR = "params"
OPT_STATE_DIR = "opt_state"
CARRIED_OPTIMIZERS = ("adafactor",)  # Manifest.optimizer_state values this version reads
TRAIN_CHECKPOINTS_DIR = "checkpoints"
# ParamsWriter's buffer: large enough that a base-sized model takes ~30 orbax partial saves, small next to the
# vocabulary-sized tensors that bound the converter's memory.
FLUSH_BYTES = 32 << 20


# The manifest.json layout `Manifest` writes; bump it (and teach `Manifest.from_json` the old one) when a field
# changes meaning, so an older gqa_uptrain refuses a newer file instead of misreading it.
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Manifest:
    """DIR/manifest.json of a converted / saved model dir: what the parameters are and where they came from.

    The JSON keys are the field names, as convert has always written them, plus `version`; files from before the
    version field read as version 1. Keys this class does not know (a `save_params(metadata=...)` caller's own)
    are kept in `extra` and written back unchanged."""
    version: int = MANIFEST_VERSION
    step: int | None = None            # training step of these parameters (convert: the source's step)
    source_step: int | None = None     # pre-training step of the checkpoint convert read
    converted_from: str | None = None  # the source's format (readers.open_source), when written by convert
    method: str | None = None          # the conversion method (convert.METHODS), when written by convert
    # Carried optimizer state (convert --carry-optimizer-state): the optimizer whose statistics DIR/opt_state holds
    # ("adafactor") and its update count, from which Adafactor's decay continues. Older readers keep both in
    # `extra` and start fresh, which is what they always did.
    optimizer_state: str | None = None
    optimizer_step: int | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pretrain_step(self) -> int | None:
        """The source's pre-training step (the α in UPTRAIN_FRACTION scales it): source_step, else step; a
        step of 0 records nothing (a fresh initialisation has no pre-training to scale)."""
        for value in (self.source_step, self.step):
            if value:
                return value
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: unset (None) fields are left out, as convert's manifests always did."""
        return {**self.extra, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                 if f.name != "extra" and getattr(self, f.name) is not None}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST_FILE) -> "Manifest":
        """A manifest from its parsed JSON (a dict); one ValueError naming `source`, the key and its value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)  # files written before the version field are version 1
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: version={version!r} is not a manifest version (a positive integer)")
        if version > MANIFEST_VERSION:
            raise ValueError(f"{source}: manifest version {version} is newer than this gqa_uptrain reads "
                             f"(version {MANIFEST_VERSION}); upgrade gqa_uptrain to read it")
        typed = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("version", "extra")}
        values: dict[str, Any] = {}
        for name in typed:
            value = data.get(name)
            if name in ("step", "source_step", "optimizer_step"):
                value = _manifest_step(value, name, source)
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{source}: {name}={value!r} must be a string or null")
            values[name] = value
        extra = {k: v for k, v in data.items() if k not in typed and k != "version"}
        return cls(version=version, extra=extra, **values)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest | None":
        """DIR/manifest.json, or None when DIR has none (a training MODEL_DIR): the one reader of the file."""
        path = pathlib.Path(directory) / MANIFEST_FILE
        if not path.exists():
            return None
        return cls.from_json(read_json(path), str(path))


def _manifest_step(value: Any, name: str, source: str) -> int | None:
    # Steps are integers; an integral float (200.0) is accepted, as the reader before this class did.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"{source}: {name}={value!r} must be a non-negative integer or null")
    return int(value)


@dataclasses.dataclass
class LoadedCheckpoint:
    config: ModelConfig
    params: Any  # nested dict of arrays, T5X names
    manifest: Manifest | None  # None for a training MODEL_DIR, which has no manifest.json
    step: int | None = None


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere os.umask must set it to read it (restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created_plainly(path: str | os.PathLike, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 whatever the umask; give temp outputs the mode open()/mkdir() would, so
    teammates can read converted checkpoints and results when the umask lets them."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# Temporary names carry the writer's PID so a later run can tell a killed writer's leftovers (PID gone) from a
# concurrent writer's work in progress (PID alive), which it must not touch.
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def remove_stale_temporaries(output: str | os.PathLike) -> list[pathlib.Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` left beside `output` by a killed run (only if PID is not alive).

    Returns what was removed. Names written before temporaries carried a PID are left alone: nothing tells
    whether their writer is still running."""
    output = pathlib.Path(output).absolute()
    removed = []
    if not output.parent.is_dir():
        return removed
    for p in output.parent.glob(f".{glob_escape(output.name)}.*"):
        m = _STALE.match(p.name)
        if not m or m.group("name") != output.name or _pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted run: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_disjoint(source: str | os.PathLike, output: str | os.PathLike, source_what: str = "source",
                   output_what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside the source (symlinks resolved), before anything is written.

    Replacing such an output (--overwrite) would delete the source, and writing inside it changes what it holds."""
    s, o = pathlib.Path(source).resolve(), pathlib.Path(output).resolve()
    if o == s:
        how = "is"
    elif o in s.parents:
        how = "contains"
    elif s in o.parents:
        how = "lies inside"
    else:
        return
    raise ValueError(f"{output_what} {output} {how} the {source_what} {source} (resolved: {s}); choose an "
                     f"{output_what} outside it, the {source_what} must not be modified")


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike, what: str,
                   base: str | os.PathLike | None = None) -> pathlib.Path:
    """`base/relative` (base defaults to root) with symlinks resolved, or a one-line ValueError if that leaves `root`.

    For names read from a checkpoint's own files (shard names, tensorstore paths): such a file must never make a
    reader open, list or hash anything outside the checkpoint. The message names only the offending name."""
    root_resolved = pathlib.Path(root).resolve()
    rel = str(relative)
    if os.path.isabs(rel) or pathlib.PurePath(rel).is_absolute():
        raise ValueError(f"{what}: {rel!r} is an absolute path; only files inside {root} may be read")
    path = (pathlib.Path(base if base is not None else root).resolve() / rel).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise ValueError(f"{what}: {rel!r} resolves outside {root}; only files inside it may be read")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (no half-written file)."""
    path = pathlib.Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        _as_if_created_plainly(tmp, directory=False)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output`, on error it is removed."""
    output = pathlib.Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        _as_if_created_plainly(tmp, directory=True)
        yield tmp
        if output.exists() or output.is_symlink():
            trash = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(trash)
            tmp.rename(output)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
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
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object of ModelConfig fields, got {type(d).__name__}")
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:  # ConfigError names the field and value; add the file
        raise ValueError(f"{path}: {e}") from None


class ParamsWriter:
    """Stream flat parameters ('encoder/layers_0/mlp/wi_0/kernel' -> array) into an orbax checkpoint at `path`.

    Tensors are buffered until `flush_bytes` are pending, then written with an orbax partial save and dropped, so
    memory holds at most the buffer plus the tensor being added, never the whole model. `close()` finalizes the
    checkpoint (orbax commits it atomically). Arrays are written uncompressed: zstd saves under 10% on float
    weights but makes tensorstore hold a second, encoded copy of every array while it writes (measured: peak
    extra memory 2.0x vs 1.1x of a 94 MiB tensor).
    """

    def __init__(self, path: str | os.PathLike, flush_bytes: int | None = None):
        from orbax.checkpoint.experimental import v1 as ocp_v1
        self.path = pathlib.Path(path).absolute()
        self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._context = ocp_v1.Context()
        self._context.array.saving.use_compression = False
        # Our arrays are never mutated after `add`, so orbax need not copy host arrays before writing them.
        self._context.memory.deepcopy_host_arrays = False

    def add(self, name: str, array: Any) -> None:
        array = np.asarray(array)
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        from flax import traverse_util
        from orbax.checkpoint.experimental.v1 import partial
        tree = traverse_util.unflatten_dict(self._pending, sep="/")
        self._pending, self._pending_bytes = {}, 0
        with self._context, _native_stderr_held():
            partial.save(self.path, tree)

    def close(self) -> None:
        from orbax.checkpoint.experimental.v1 import partial
        self.flush()
        with self._context, _native_stderr_held():
            partial.finalize(self.path)


def write_checkpoint(output: str | os.PathLike, config: ModelConfig, tensors: Iterable[tuple[str, Any]],
                     metadata: Manifest | Mapping[str, Any] | None = None, overwrite: bool = False,
                     extra_files: Mapping[str, str | Callable[[], str]] | None = None,
                     source: str = "params",
                     optimizer_state: Callable[[], Iterable[tuple[str, Any]]] | None = None) -> pathlib.Path:
    """Stream (flat name, array) pairs into a converted-model dir at `output`, atomically.

    Every name and shape is checked against `config` as it arrives and missing names at the end, each failure one
    ValueError naming the key; on any error nothing is left at `output`.
    extra_files: file name -> text (or a function returning it, called after the tensors are written) written into
    the same directory inside the same atomic step.
    source: names the input in error messages.
    optimizer_state: a function, called after the tensors are written, returning ('v_row/<param>', array) pairs
    for DIR/opt_state (see the module docstring); the manifest must then record `optimizer_state`."""
    # Checked before the tensors stream in: a bad manifest should not cost a whole conversion.
    manifest = metadata if isinstance(metadata, Manifest) else Manifest.from_json(metadata or {}, "manifest metadata")
    if (manifest.optimizer_state is None) != (optimizer_state is None):
        raise ValueError(f"manifest optimizer_state={manifest.optimizer_state!r} but "
                         f"{'no' if optimizer_state is None else 'an'} optimizer state to write: they must agree")
    want = expected_shapes(config)
    seen: set[str] = set()
    with atomic_directory(output, overwrite) as tmp:
        writer = ParamsWriter(tmp / PARAMS_DIR)
        for name, array in tensors:
            if name not in want:
                raise ValueError(f"{source}: unexpected parameter {name!r} for this config")
            if name in seen:
                raise ValueError(f"{source}: parameter {name!r} given twice")
            if tuple(np.shape(array)) != want[name]:
                raise ValueError(f"{source}: {name} has shape {tuple(np.shape(array))}, expected {want[name]} "
                                 "for this config")
            seen.add(name)
            writer.add(name, array)
            # Not dead: the loop variable would keep this tensor alive while the next one is read (after a flush
            # the writer no longer holds it), two tensors instead of one at the streaming peak.
            del array
        missing = sorted(set(want) - seen)
        if missing:
            raise ValueError(f"{source}: missing {len(missing)} parameter(s), first {missing[0]!r} "
                             f"(expected shape {want[missing[0]]})")
        writer.close()
        if optimizer_state is not None:
            if manifest.optimizer_state not in CARRIED_OPTIMIZERS:
                raise ValueError(f"manifest optimizer_state={manifest.optimizer_state!r} is not one of "
                                 f"{CARRIED_OPTIMIZERS}")
            state_writer = ParamsWriter(tmp / OPT_STATE_DIR)
            for name, array in optimizer_state():
                state_writer.add(name, array)
            state_writer.close()
        write_config_files(tmp, config)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text() if callable(text) else text)
    return pathlib.Path(output)


def save_params(output: str | os.PathLike, params: Any, config: ModelConfig,
                metadata: Manifest | Mapping[str, Any] | None = None,
                overwrite: bool = False, extra_files: dict[str, str] | None = None) -> pathlib.Path:
    """Write an in-memory params tree (nested or flat) with config.json, model.gin and manifest.json to `output`."""
    check_params_match_config(params, config)
    return write_checkpoint(output, config, flat_params(params).items(), metadata, overwrite, extra_files)


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


def _pytree_dir(params_dir: pathlib.Path) -> pathlib.Path:
    """The directory holding the pytree: DIR/params/state (ParamsWriter) or DIR/params (earlier versions)."""
    if (params_dir / "_METADATA").exists():
        return params_dir
    found = sorted(p.parent for p in params_dir.glob("*/_METADATA"))
    if len(found) != 1:
        raise FileNotFoundError(f"{params_dir} is not a complete orbax checkpoint (no pytree _METADATA found)")
    return found[0]


def _locate(directory: str | os.PathLike, step: int | None) -> tuple[ModelConfig, Manifest | None, int | None,
                                                                       pathlib.Path]:
    """(config, manifest, step, pytree dir) of a converted dir or of a training run's latest / given step."""
    import orbax.checkpoint as ocp
    directory = pathlib.Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = read_config(directory)
    manifest = Manifest.read(directory)
    if (directory / PARAMS_DIR).exists():
        if step is not None:
            # A converted/exported dir holds one set of parameters; silently ignoring the step would hand back
            # parameters the caller did not ask for.
            raise ValueError(f"--step {step}: {directory} is a converted checkpoint without training steps; drop "
                             "--step (or pass a training MODEL_DIR)")
        return config, manifest, manifest.step if manifest else None, _pytree_dir(directory / PARAMS_DIR)
    run_dir = directory / TRAIN_CHECKPOINTS_DIR
    if run_dir.exists():
        with ocp.CheckpointManager(run_dir, item_names=("params",)) as mngr:
            steps = mngr.all_steps()
        step = (max(steps) if steps else None) if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir} holds no complete checkpoint")
        if step not in steps:
            raise FileNotFoundError(f"--step {step}: {run_dir} has no complete checkpoint for that step (available: "
                                    f"{', '.join(str(s) for s in sorted(steps)) or 'none'})")
        return config, manifest, int(step), run_dir / str(step) / PARAMS_DIR
    raise FileNotFoundError(f"{directory} has neither {PARAMS_DIR}/ nor {TRAIN_CHECKPOINTS_DIR}/: "
                            "not a gqa_uptrain checkpoint")


def load_params(directory: str | os.PathLike, step: int | None = None) -> LoadedCheckpoint:
    """Load params + config from a converted checkpoint dir or the latest (or given) step of a training run."""
    import orbax.checkpoint as ocp
    config, manifest, step, pytree_dir = _locate(directory, step)
    with _native_stderr_held(), ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(pytree_dir, _restore_args(config).item)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types; translated, not swallowed
            raise restore_error(e, pytree_dir, expected_shapes(config)) from e
    return LoadedCheckpoint(config, params, manifest, step)


def _native_stderr_held():
    """Hold what is written to fd 2 during a restore: shown afterwards on success, dropped on failure (unless
    GQA_UPTRAIN_DEBUG=1). A failed tensorstore read prints a traceback per in-flight array from its own threads
    ("Event loop is closed"), hundreds of lines before the one-line error that names the problem."""
    return native_stderr.held(replay_on_success=True, replay_on_failure=os.environ.get("GQA_UPTRAIN_DEBUG") == "1")


def read_json(path: pathlib.Path) -> Any:
    """A JSON file, or one error line naming it (json's own message names only line and column)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def restore_error(e: BaseException, pytree_dir: pathlib.Path, expected: Mapping[str, tuple[int, ...]]
                  ) -> ValueError:
    """One line for an orbax restore that failed: the tensor whose shape differs from config.json, or the damaged
    data file, instead of a TensorStore spec dump. The original stays chained for GQA_UPTRAIN_DEBUG=1."""
    import re
    chain, cur = [], e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(c) for c in chain)
    if "is not compatible with the stored shape" in text:
        try:
            import orbax.checkpoint as ocp
            with ocp.PyTreeCheckpointer() as ckptr:
                stored = flat_params(ckptr.metadata(pytree_dir).item_metadata.tree)
            for name in sorted(expected):
                shape = tuple(getattr(stored.get(name), "shape", expected[name]))
                if shape != tuple(expected[name]):
                    return ValueError(f"{pytree_dir}: tensor {name} is stored with shape {shape} but "
                                      f"{CONFIG_FILE} implies {tuple(expected[name])}: config.json does not "
                                      "describe these parameters")
        except Exception:  # noqa: BLE001 - naming the tensor is best effort; the shapes below still are one line
            pass
        m = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))", text)
        return ValueError(f"{pytree_dir}: a tensor is stored with shape {m and m.group(2)} but {CONFIG_FILE} "
                          f"implies {m and m.group(1)}: config.json does not describe these parameters")
    for c in reversed(chain):  # the innermost error names the file and the tensor
        msg = str(c).strip().splitlines()[0] if str(c).strip() else ""
        if re.match(r"[A-Z_]+: ", msg) or isinstance(c, OSError):
            return ValueError(f"{pytree_dir}: damaged or incomplete checkpoint data ({msg[:300]})")
    return ValueError(f"{pytree_dir}: cannot restore the parameters ({str(e).strip().splitlines()[0][:300]})")


class TensorSource(Mapping):
    """Lazy flat mapping our name ('decoder/layers_0/mlp/wo/kernel') -> numpy array in our layout (float32 unless
    `dtypes` says otherwise); a `readers.TensorReader`.

    Shapes are known (and were checked) before any data is read; each lookup reads one tensor from disk, which lets
    the converter and exporter stream a checkpoint one tensor at a time."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray],
                 dtypes: Mapping[str, Any] | None = None):
        self._shapes = dict(shapes)
        self._load = load
        self._dtypes = dict(dtypes or {})

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> np.dtype:
        if name not in self._shapes:
            raise KeyError(name)
        return np.dtype(self._dtypes.get(name, np.float32))

    def __contains__(self, name: object) -> bool:
        return name in self._shapes  # Mapping's default would read the tensor

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _partial_restore_loader(pytree_dir: pathlib.Path, shapes: Mapping[str, tuple[int, ...]]
                            ) -> Callable[[str], np.ndarray]:
    """name -> that one float32 tensor, read with an orbax partial restore."""
    import orbax.checkpoint as ocp
    from flax import traverse_util
    ckptr = ocp.PyTreeCheckpointer()  # one for all lookups: creating one costs more than a small read
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def load(name: str) -> np.ndarray:
        item = traverse_util.unflatten_dict(
            {name: jax.ShapeDtypeStruct(shapes[name], np.float32, sharding=device)}, sep="/")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
        with _native_stderr_held():
            try:
                out = ckptr.restore(pytree_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                            partial_restore=True))
            except Exception as e:  # noqa: BLE001 - translated to one line naming the tensor, original chained
                raise restore_error(e, pytree_dir, {name: shapes[name]}) from e
        return np.asarray(traverse_util.flatten_dict(out, sep="/")[name])
    return load


def open_params(directory: str | os.PathLike, step: int | None = None) -> LoadedCheckpoint:
    """Like `load_params`, but `params` is a `TensorSource` (flat, read tensor by tensor)."""
    config, manifest, step, pytree_dir = _locate(directory, step)
    shapes = expected_shapes(config)
    return LoadedCheckpoint(config, TensorSource(shapes, _partial_restore_loader(pytree_dir, shapes)), manifest, step)


@dataclasses.dataclass
class OptimizerMoments:
    """Adafactor's second-moment statistics of a checkpoint, keyed by our flat parameter names.

    moments: name -> {"v_row", "v_col"} (factored) or {"v"} (see optim.second_moment); step: Adafactor's update
    count; min_dim_size_to_factor: the factoring threshold the statistics were kept with (128 unless recorded)."""
    step: int
    moments: dict[str, dict[str, np.ndarray]]
    min_dim_size_to_factor: int = 128


def _restore_whole(pytree_dir: pathlib.Path) -> Any:
    """Every array of an orbax pytree, unsharded on this process's first device, in its stored structure."""
    import orbax.checkpoint as ocp
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _native_stderr_held(), ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.metadata(pytree_dir).item_metadata.tree
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
            return ckptr.restore(pytree_dir, target)
        except Exception as e:  # noqa: BLE001 - translated to one line, original chained
            raise ValueError(f"{pytree_dir}: cannot restore the optimizer state "
                             f"({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})"
                             ) from e


def moments_from_fields(fields: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]],
                         where: str) -> dict[str, dict[str, np.ndarray]]:
    """{'v_row': flat, 'v_col': flat, 'v': flat} (optax / T5X trees, (1,)-placeholders included) -> per parameter
    statistics: the full `v` where it has the parameter's shape, else the factored pair."""
    out = {}
    for name, shape in shapes.items():
        v = fields.get("v", {}).get(name)
        row, col = fields.get("v_row", {}).get(name), fields.get("v_col", {}).get(name)
        if v is not None and tuple(np.shape(v)) == tuple(shape):
            out[name] = {"v": np.asarray(v, np.float32)}
        elif row is not None and col is not None:  # whether they fit the shape is checked where they are used
            out[name] = {"v_row": np.asarray(row, np.float32), "v_col": np.asarray(col, np.float32)}
        else:
            raise ValueError(f"{where}: no second-moment statistics for {name!r} (shape {tuple(shape)})")
    return out


def _run_min_dim(directory: pathlib.Path) -> int:
    """The min_dim_size_to_factor a training run used (its train_config.json), 128 (T5X's) when not recorded."""
    path = directory / "train_config.json"
    try:
        value = read_json(path).get("optimizer", {}).get("min_dim_size_to_factor") if path.exists() else None
    except (ValueError, AttributeError):
        value = None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 128


def read_optimizer_moments(directory: str | os.PathLike, step: int | None = None) -> OptimizerMoments:
    """Adafactor statistics of a training MODEL_DIR's latest (or given) checkpoint, or of a converted dir written
    with carried state; ValueError saying what the directory holds instead."""
    config, manifest, step, pytree_dir = _locate(directory, step)
    directory = pathlib.Path(directory).absolute()
    shapes = expected_shapes(config)
    if (directory / PARAMS_DIR).exists():
        if manifest is None or manifest.optimizer_state is None:
            raise ValueError(f"{directory} holds parameters only (no optimizer state was carried into it); convert "
                             "from a training run dir or a T5X checkpoint to carry the optimizer state")
        if manifest.optimizer_state not in CARRIED_OPTIMIZERS:
            raise ValueError(f"{directory / MANIFEST_FILE}: optimizer_state={manifest.optimizer_state!r} is not one "
                             f"this gqa_uptrain reads ({', '.join(CARRIED_OPTIMIZERS)})")
        if manifest.optimizer_step is None:
            raise ValueError(f"{directory / MANIFEST_FILE}: optimizer_state is set but optimizer_step is missing")
        tree = _restore_whole(_pytree_dir(directory / OPT_STATE_DIR))
        fields = {k: dict(flat_params(v)) for k, v in tree.items()}
        return OptimizerMoments(manifest.optimizer_step, moments_from_fields(fields, shapes, str(directory)),
                                _run_min_dim(directory))
    state_dir = pytree_dir.parent / OPT_STATE_DIR
    if not state_dir.exists():
        raise ValueError(f"{pytree_dir.parent} has no {OPT_STATE_DIR} item")
    tree = _restore_whole(_pytree_dir(state_dir))
    parts = tree if isinstance(tree, (list, tuple)) else [tree]
    factored = [p for p in parts if isinstance(p, Mapping) and {"count", "v_row", "v_col", "v"} <= set(p)]
    if len(factored) != 1:
        raise ValueError(f"{state_dir}: no Adafactor (optax factored-RMS) state found; only Adafactor state can be "
                         "carried")
    fs = factored[0]
    fields = {k: dict(flat_params(fs[k])) for k in ("v_row", "v_col", "v")}
    return OptimizerMoments(int(np.asarray(fs["count"])), moments_from_fields(fields, shapes, str(state_dir)),
                            _run_min_dim(directory))


def restore_carried_opt_state(directory: str | os.PathLike, abstract_state: Any, param_shapes: Any, shardings: Any,
                              min_dim_size_to_factor: int) -> tuple[Any, int] | None:
    """(sharded optimizer state, carried step) from the optimizer state a converted dir carries, or None when it
    carries none (train then starts fresh). The one place `train` restores carried state: statistics re-factored
    for this optimizer (`optim.carried_opt_state`), each leaf placed with its sharding from `shardings`."""
    manifest = Manifest.read(directory)
    if manifest is None or manifest.optimizer_state is None:
        return None
    from gqa_uptrain.optim import carried_opt_state
    carried = read_optimizer_moments(directory)
    host = carried_opt_state(abstract_state, param_shapes, carried.moments, carried.step, min_dim_size_to_factor)
    state = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                         host, shardings)
    return state, carried.step


def nonfinite_count(array: Any) -> int:
    """Number of NaN/Inf entries of a float array (0 for integer arrays)."""
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _nonfinite_message(where: str, name: str, count: int, size: int, flag: str) -> str:
    return (f"{where}: tensor {name!r} has {count} non-finite (NaN/Inf) value(s) of {size}; refusing to use it "
            f"(pass {flag} to proceed anyway)")


def checked_finite(tensors: Mapping[str, Any], where: str, allow: bool = False,
                   flag: str = "--allow-nonfinite") -> "TensorSource":
    """A lazy view of `tensors` that checks each tensor when it is read: NaN/Inf is a ValueError naming the tensor
    and count, or (allow=True) a warning on stderr. Streaming readers keep reading one tensor at a time."""
    def load(name: str) -> np.ndarray:
        arr = tensors[name]
        bad = nonfinite_count(arr)
        if bad:
            msg = _nonfinite_message(where, name, bad, int(np.size(arr)), flag)
            if not allow:
                raise ValueError(msg)
            print(f"warning: {msg.split('; refusing')[0]} (proceeding: {flag})", file=sys.stderr)
        return arr
    if isinstance(tensors, TensorSource) or (callable(getattr(tensors, "shape", None))
                                             and callable(getattr(tensors, "dtype", None))):
        return TensorSource({n: tensors.shape(n) for n in tensors}, load, {n: tensors.dtype(n) for n in tensors})
    arrays = {n: np.asarray(tensors[n]) for n in tensors}  # an in-memory dict: nothing to stream
    return TensorSource({n: a.shape for n, a in arrays.items()}, load, {n: a.dtype for n, a in arrays.items()})


def check_tree_finite(params: Any, where: str, allow: bool = False, flag: str = "--allow-nonfinite") -> None:
    """In-memory parameters: report every non-finite tensor (name and count) and refuse unless `allow`."""
    from flax import traverse_util
    bad = {k: (nonfinite_count(v), int(np.size(v))) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    bad = {k: v for k, v in bad.items() if v[0]}
    if not bad:
        return
    first = sorted(bad)[0]
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    msg = _nonfinite_message(where, first, *bad[first], flag).replace("; refusing", f"{more}; refusing")
    if not allow:
        raise ValueError(msg)
    print(f"warning: {msg.split('; refusing')[0]} (proceeding: {flag})", file=sys.stderr)
