"""gqa-uptrain convert: MHA (or GQA) checkpoint -> GQA checkpoint directory, or a comparison of init methods."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

from gqa_uptrain.cli.common import add_gin_arguments

HELP = "Convert an MHA checkpoint (HF / T5X / orbax) to GQA/MQA"
DESCRIPTION = """Convert a T5.1.1 checkpoint to grouped-query attention (Ainslie et al. 2023).

Reads Hugging Face (safetensors, sharded safetensors, or pickle .bin only with torch), T5X native (msgpack +
tensorstore) or gqa_uptrain checkpoints one tensor at a time, merges the key/value heads of each group and writes
DIR/params (orbax), config.json, model.gin, manifest.json and conversion.json atomically.

Head order: query head i uses key/value head i // (num_heads / G) (contiguous groups, as HF repeat_kv)."""
EPILOG = """methods:
  mean    paper default: average K/V kernels within a group
  first   keep the first head of each group (paper ablation)
  random  fresh T5X init of K/V (paper ablation; seeded by --seed)
  align   Procrustes-align heads on calibration K/V, then mean (arXiv:2412.20677); function-preserving rotation
  svd     activation-aware shared K/V from the top principal directions of the group's calibration K/V
          (arXiv:2406.07056); the per-head bases are folded into query/out kernels

examples:
  gqa-uptrain convert --source hf_t5_large/ --num-kv-heads 8 --output /tmp/t5_large_gqa8
  gqa-uptrain convert --source t5x/checkpoint_1000000 --num-kv-heads 1 --method align --output /tmp/mqa
  gqa-uptrain convert --source /tmp/tiny_mha --num-kv-heads 2 --compare      # loss of every method at alpha=0"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.convert import LAYER_CHOICES, METHODS, MOMENT_RULES
    parser.add_argument("--source", required=True, metavar="PATH",
                        help="source checkpoint: HF dir or .safetensors/.index.json/.bin file, T5X checkpoint_N dir "
                             "(or its 'checkpoint' file, or a T5X model dir: latest step), or a gqa_uptrain dir")
    parser.add_argument("--source-format", default="auto", metavar="FORMAT",
                        help="one of auto, hf, t5x, orbax (default auto: detected from the files present)")
    parser.add_argument("--num-kv-heads", type=int, required=True, metavar="G",
                        help="target key/value heads G; must divide num_heads and the source's current KV heads "
                             "(G=1: MQA, G=num_heads: MHA)")
    parser.add_argument("--layers", default="decoder", choices=LAYER_CHOICES,
                        help="which attention to convert: decoder (self + cross, the paper; encoder stays MHA) or "
                             "all (encoder too). Default decoder")
    parser.add_argument("--method", default="mean", choices=METHODS, help="how to initialise the shared K/V heads "
                        "(see below); default mean")
    parser.add_argument("--calibration", default="auto", metavar="DATA",
                        help="calibration tokens for align/svd: 'bundled' (span corruption on the bundled corpus, "
                             "train split; needs the bundled vocabulary), 'random' (uniform random tokens), a "
                             "JSONL file with 'inputs'/'targets' (text or token-id lists) or a text file (one "
                             "example per line), or 'auto' (bundled if the vocab fits, else random)")
    parser.add_argument("--calibration-examples", type=int, default=32, metavar="N",
                        help="calibration examples (default 32)")
    parser.add_argument("--calibration-length", type=int, default=128, metavar="L",
                        help="calibration input length in tokens (targets get L/4 for span corruption); default 128")
    parser.add_argument("--vocab", default=None, metavar="SPM",
                        help="SentencePiece model used to tokenise text in --calibration/--compare-data files "
                             "(default: the bundled vocabulary)")
    parser.add_argument("--output", metavar="DIR", help="output directory (required unless --compare)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random method and calibration sampling")
    parser.add_argument("--compare", action="store_true",
                        help="convert with every method in memory and print the held-out loss of each converted "
                             "model before uptraining (alpha=0); with --output the --method result is also written")
    parser.add_argument("--compare-methods", default=",".join(METHODS), metavar="M1,M2",
                        help=f"methods to compare (default {','.join(METHODS)})")
    parser.add_argument("--compare-data", default=None, metavar="FILE",
                        help="validation data for --compare (JSONL or text, as --calibration); default: span "
                             "corruption on the bundled validation split")
    parser.add_argument("--compare-examples", type=int, default=64, metavar="N",
                        help="validation examples for --compare (default 64)")
    parser.add_argument("--carry-optimizer-state", action="store_true",
                        help="also convert the source's Adafactor state (second moments and step count) into "
                             "DIR/opt_state, so `train` continues it instead of restarting Adafactor from zero "
                             "(sources: gqa_uptrain run dirs, dirs converted with this flag, T5X checkpoints; HF "
                             "checkpoints hold none). Default off: the paper restores parameters only")
    parser.add_argument("--moment-rule", default=None, choices=MOMENT_RULES,
                        help="how the second moments of a group's K/V heads merge with --carry-optimizer-state: "
                             "sum (default: the shared kernel's gradient is the sum of the heads' gradients) or "
                             "mean (sum / heads per group); see docs/convert.md")
    from gqa_uptrain.cli.common import add_progress_argument
    add_progress_argument(parser)
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert even if source tensors hold NaN/Inf (reported either way; refused by default)")
    # T5X checkpoints carry no config: --gin_file gives the architecture instead of inferring it from shapes.
    add_gin_arguments(parser)


def _check_counts(args: argparse.Namespace) -> None:
    """Sizes that must be positive, checked before any file is read (0 examples fails deep in numpy otherwise)."""
    for flag in ("calibration_examples", "calibration_length", "compare_examples"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _token_batch(spec: str, config, args, split: str, n: int):
    from gqa_uptrain.token_batches import token_batch
    return token_batch(spec, config.vocab_size, n, args.calibration_length, args.seed, split, args.vocab)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_loss(params, config, batch, batch_size: int = 16) -> float:
    """Mean token cross-entropy of teacher-forced targets (padding excluded), from the model's loss
    (`seq2seq.EncoderDecoderModel.evaluate`, as the trainer's eval and `gqa-uptrain eval` report it).
    batch: (encoder tokens, decoder inputs, targets), each [n, length], scored batch_size rows at a time."""
    from gqa_uptrain.seq2seq import EncoderDecoderModel
    from gqa_uptrain.trees import nested_params
    nested = nested_params(params)
    names = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
    batches = [{k: v[i:i + batch_size] for k, v in zip(names, batch)} for i in range(0, len(batch[0]), batch_size)]
    return EncoderDecoderModel(config).evaluate(nested, batches)["loss"]


# ---------------------------------------------------------------------------------------------- run


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("gqa_uptrain", "jax", "flax", "numpy", "orbax-checkpoint", "safetensors", "tensorstore"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run(args: argparse.Namespace) -> int:
    from gqa_uptrain import convert, readers
    from gqa_uptrain.checkpoint import Manifest, write_checkpoint

    if args.source_format not in readers.FORMATS:
        raise ValueError(f"unknown --source-format {args.source_format!r}; choose one of {readers.FORMATS}")
    methods = [m.strip() for m in args.compare_methods.split(",") if m.strip()]
    for m in methods:
        if m not in convert.METHODS:
            raise ValueError(f"unknown method {m!r} in --compare-methods; choose from {convert.METHODS}")
    if not args.output and not args.compare:
        raise ValueError("--output is required (or pass --compare to only compare methods)")
    _check_counts(args)
    out = pathlib.Path(args.output).absolute() if args.output else None
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
    source_path = pathlib.Path(args.source)
    if not source_path.exists():
        raise FileNotFoundError(f"source {source_path} does not exist")
    if out is not None:
        from gqa_uptrain.checkpoint import check_disjoint
        check_disjoint(source_path, out, "--source", "--output")
    if args.carry_optimizer_state and out is None:
        raise ValueError("--carry-optimizer-state needs --output (the state is written with the parameters)")
    if args.moment_rule is not None and not args.carry_optimizer_state:
        raise ValueError("--moment-rule only applies with --carry-optimizer-state")
    moment_rule = args.moment_rule or "sum"

    gin_config = None
    if args.gin_file:
        from gqa_uptrain.cli.common import model_config
        gin_config = model_config(args)
    src = readers.open_source(source_path, args.source_format, gin_config)  # names and shapes checked, no data read
    cfg = src.config
    convert.validate_target(cfg, args.num_kv_heads, args.layers)
    # Read (and checked) before any conversion work: a source without optimizer state fails in a second.
    carried = _source_moments(src, args) if args.carry_optimizer_state else None

    needs_calib = args.method in convert.DATA_METHODS or (args.compare and set(methods) & set(convert.DATA_METHODS))
    # Calibration and --compare run the source model, so they need it in memory once; the data-free methods
    # (mean, first, random) stream: read, convert and write one tensor (one attention module) at a time.
    from gqa_uptrain.checkpoint import checked_finite
    # Every read (streamed or load_all) goes through the NaN/Inf check.
    src.tensors = checked_finite(src.tensors, str(src.path), args.allow_nonfinite)
    tensors = src.tensors
    if needs_calib or args.compare:
        tensors = src.load_all(None if args.no_progress else _tqdm("read", "tensor"))
    calibration, calib_desc = None, None
    if needs_calib:
        batch, calib_desc = _token_batch(args.calibration, cfg, args, "train", args.calibration_examples)
        calibration = convert.collect_calibration(tensors, cfg, *batch, layers=args.layers, seed=args.seed)
        calib_desc = {"data": calib_desc, "examples": int(len(batch[0])), "rows_per_module": {
            k: int(v.shape[0]) for k, v in list(calibration.items())[:1]}}

    if args.compare:
        _compare(tensors, cfg, args, methods, calibration)
        if out is None:
            return 0

    t0 = time.time()
    grouping: dict[str, Any] = {}
    new_config = convert.target_config(cfg, args.num_kv_heads, args.layers)
    transforms: dict[str, Any] = {}
    items = convert.iter_converted(tensors, cfg, args.num_kv_heads, args.layers, args.method, args.seed,
                                   calibration, grouping, measure_error=calibration is not None,
                                   transforms=transforms)
    if not args.no_progress:
        from tqdm import tqdm
        items = tqdm(items, total=len(tensors), desc=f"convert ({args.method})", unit="tensor", file=sys.stderr,
                     leave=False)

    def record() -> str:  # after the stream: grouping is filled in as modules are converted
        return json.dumps({
            "source": str(source_path.absolute()), "source_format": src.format, "source_step": src.step,
            "method": args.method, "num_kv_heads": args.num_kv_heads, "layers": args.layers, "seed": args.seed,
            "calibration": calib_desc, "optimizer_state": carried and {
                "optimizer": "adafactor", "step": carried.step, "moment_rule": moment_rule,
                "min_dim_size_to_factor": carried.min_dim_size_to_factor}, "head_order": "contiguous: query head i uses kv head i // (num_heads / G)",
            "source_config": cfg.to_dict(), "config": new_config.to_dict(), "grouping": grouping,
            "versions": _versions(), "source_sha256": readers.sha256_files(src.files), "source_info": src.info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n"

    def optimizer_items():  # after the parameters: align/svd's per-head transforms are known by then
        moments = convert.convert_moments(carried.moments, cfg, args.num_kv_heads, args.layers, transforms,
                                          moment_rule, carried.min_dim_size_to_factor)
        for name, stats in moments.items():
            for field, array in stats.items():
                yield f"{field}/{name}", array

    manifest = Manifest(step=src.step, source_step=src.step, converted_from=src.format, method=args.method,
                        optimizer_state="adafactor" if carried else None,
                        optimizer_step=carried.step if carried else None)
    write_checkpoint(out, new_config, items, manifest,
                     overwrite=args.overwrite, extra_files={"conversion.json": record}, source=str(src.path),
                     optimizer_state=optimizer_items if carried else None)
    carried_note = f", Adafactor state carried (step {carried.step}, rule {moment_rule})" if carried else ""
    print(f"wrote {out}: {new_config.num_heads} query heads, kv heads encoder={new_config.encoder_kv_heads} "
          f"decoder_self={new_config.decoder_self_kv_heads} decoder_cross={new_config.decoder_cross_kv_heads}, "
          f"method={args.method}, source step={src.step}{carried_note} ({time.time() - t0:.1f}s)", file=sys.stderr)
    return 0


def _source_moments(src, args):
    """The source's Adafactor statistics, NaN/Inf-checked like its parameters."""
    from gqa_uptrain import readers
    from gqa_uptrain.checkpoint import check_tree_finite
    carried = readers.read_optimizer_moments(src)
    check_tree_finite({name: stats for name, stats in carried.moments.items()}, f"{src.path} (optimizer state)",
                      args.allow_nonfinite)
    return carried


def _tqdm(desc: str, unit: str):
    from tqdm import tqdm

    def wrap(it):
        try:
            total = len(it)
        except TypeError:
            total = None
        return tqdm(it, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False)
    return wrap


def _compare(flat, cfg, args, methods, calibration) -> None:
    from gqa_uptrain import convert
    from gqa_uptrain.token_batches import bundled_fits
    if args.compare_data:
        batch, _ = _token_batch(args.compare_data, cfg, args, "validation", args.compare_examples)
    elif bundled_fits(cfg.vocab_size):
        batch, _ = _token_batch("bundled", cfg, args, "validation", args.compare_examples)
    else:
        raise ValueError(f"--compare needs --compare-data: the source vocabulary ({cfg.vocab_size}) is not the "
                         "bundled one")
    rows = [("source (unconverted)", evaluate_loss(flat, cfg, batch), None, None, 0.0)]
    for m in methods:
        t = time.time()
        res = convert.convert_params(flat, cfg, args.num_kv_heads, args.layers, m, args.seed, calibration,
                                     measure_error=True)
        loss = evaluate_loss(res.params, res.config, batch)
        ke = float(sum(v["k_rel_error"] for v in res.grouping.values()) / len(res.grouping))
        ve = float(sum(v["v_rel_error"] for v in res.grouping.values()) / len(res.grouping))
        rows.append((m, loss, ke, ve, time.time() - t))
    base = rows[0][1]
    print(f"held-out loss at alpha=0, G={args.num_kv_heads}, layers={args.layers}, {len(batch[0])} examples")
    print(f"{'method':<22} {'loss':>8} {'delta':>8} {'K err':>7} {'V err':>7} {'sec':>6}")
    for name, loss, ke, ve, sec in rows:
        fmt = (lambda x: f"{x:7.3f}" if x is not None else f"{'-':>7}")  # noqa: E731
        print(f"{name:<22} {loss:8.4f} {loss - base:+8.4f} {fmt(ke)} {fmt(ve)} {sec:6.1f}")
    best = min(rows[1:], key=lambda r: r[1])[0]
    print(f"best: {best} (K/V err: relative calibration reconstruction error, mean over converted modules)")
