"""gqa-uptrain eval: decode a task or file with a checkpoint and score it (ROUGE, BLEU, EM/F1, teacher-forced loss)."""
from __future__ import annotations

import argparse
import json
import sys

import gin

from gqa_uptrain.cli.infer_cmd import add_decoding_arguments

HELP = "Evaluate a checkpoint: decode and score (ROUGE, BLEU, EM/F1) and teacher-forced loss"
DESCRIPTION = HELP + """.

Data: a registered seqio task (--task; gqa_wordnet_gloss and gqa_span_corruption are bundled) or a seq2seq file
(--data; .jsonl with "inputs"/"targets" fields, or .tsv inputs<TAB>targets; .gz allowed). Targets may be lists
(several references). For gqa_span_corruption only the teacher-forced loss is meaningful and is the default.

Metrics (0-100 except loss): rouge = ROUGE-1/2/L F-measure (rouge-score, stemmed); bleu = sacrebleu corpus BLEU;
em_f1 = SQuAD-normalised exact match and token F1; loss = mean cross-entropy per target token (nats), perplexity
and token accuracy. Results are printed as a table and written to --output as JSON.

Settings may also come from gin (configs/runs/eval.gin binds EvalSettings.*); flags given on the command line win.

Examples:
  gqa-uptrain eval --checkpoint /tmp/finetune --task gqa_wordnet_gloss --num_examples 200 --output results.json
  gqa-uptrain eval --checkpoint /tmp/uptrain --task gqa_span_corruption --num_examples 256
  gqa-uptrain eval --checkpoint /tmp/gqa8 --data dev.tsv --metrics rouge,bleu --method beam
  gqa-uptrain eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=/tmp/finetune"""

BUILTIN = {"task": None, "data": None, "split": "validation", "metrics": None, "num_examples": None,
           "max_input_length": 512, "max_target_length": 256, "max_decode_length": 64, "batch_size": 16,
           "method": "greedy", "checkpoint": None, "output": None}


@gin.configurable("EvalSettings")
def eval_settings(task=None, data=None, split=None, metrics=None, num_examples=None, max_input_length=None,
                  max_target_length=None, max_decode_length=None, batch_size=None, method=None, checkpoint=None,
                  output=None) -> dict:
    """Gin-bound defaults for `gqa-uptrain eval` (None = not set)."""
    return {k: v for k, v in locals().items() if v is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="converted checkpoint dir or training MODEL_DIR (required, here or via gin)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, metavar="NAME", help="seqio task, e.g. gqa_wordnet_gloss")
    src.add_argument("--data", default=None, metavar="FILE", help="seq2seq .jsonl or .tsv file")
    parser.add_argument("--split", default=None, help="task split (default validation)")
    parser.add_argument("--metrics", default=None, metavar="LIST",
                        help="comma-separated from rouge,bleu,em_f1,loss (default: all for seq2seq data, loss for "
                             "gqa_span_corruption)")
    parser.add_argument("--num_examples", type=int, default=None, metavar="N", help="evaluate the first N examples "
                        "(default all)")
    parser.add_argument("--max_target_length", type=int, default=None,
                        help="truncate targets for the loss to this many tokens (default 256)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output / --predictions if they exist")
    parser.add_argument("--predictions", default=None, metavar="FILE",
                        help="also write JSONL {input, prediction, reference} here")
    add_decoding_arguments(parser)
    add_gin_arguments(parser)


def _settings(args: argparse.Namespace) -> dict:
    s = dict(BUILTIN)
    if args.gin_file or getattr(args, "gin_bindings", None):
        from gqa_uptrain.cli.common import load_gin
        load_gin(args)
        s.update(eval_settings())
    if args.data is not None:  # a flag source replaces a gin-bound one
        s["task"] = None
    if args.task is not None:
        s["data"] = None
    for k in BUILTIN:
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    if not s["checkpoint"]:
        raise ValueError("no checkpoint: pass --checkpoint DIR (or bind EvalSettings.checkpoint)")
    if bool(s["task"]) == bool(s["data"]):
        raise ValueError("pass exactly one of --task NAME or --data FILE")
    return s


def _examples(s: dict, vocab):
    """-> list of dicts with 'inputs'/'targets' token lists and 'input_text'/'references' strings."""
    from gqa_uptrain.decode import EOS_ID
    if s["data"]:
        from gqa_uptrain.evaluate import read_seq2seq_file
        pairs = read_seq2seq_file(s["data"])
        if s["num_examples"] is not None:
            pairs = pairs[: s["num_examples"]]
        out = []
        for text, ref in pairs:
            first = ref if isinstance(ref, str) else ref[0]
            out.append({"inputs": list(vocab.encode(text))[: s["max_input_length"] - 1] + [EOS_ID],
                        "targets": list(vocab.encode(first))[: s["max_target_length"] - 1] + [EOS_ID],
                        "input_text": text, "references": ref})
        return out
    from gqa_uptrain.tf_quiet import seqio  # via tf_quiet: a plain import prints TF start-up lines

    from gqa_uptrain import data
    if s["task"] not in seqio.TaskRegistry.names():
        raise ValueError(f"unknown task {s['task']!r}; registered: {', '.join(sorted(seqio.TaskRegistry.names()))}")
    raw = data.fixed_validation_examples(
        s["task"], {"inputs": s["max_input_length"], "targets": s["max_target_length"]},
        -1 if s["num_examples"] is None else s["num_examples"], seed=data.VALIDATION_SEED, split=s["split"])
    def text(ex, key):
        if f"{key}_pretokenized" not in ex:  # e.g. span corruption: only the corrupted ids exist
            return vocab.decode(ex[key].tolist())
        value = ex[f"{key}_pretokenized"]
        value = value.item() if hasattr(value, "item") else value
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    out = []
    for ex in raw:
        out.append({"inputs": ex["inputs"].tolist(), "targets": ex["targets"].tolist(),
                    "input_text": text(ex, "inputs"), "references": text(ex, "targets")})
    if not out:
        raise ValueError(f"task {s['task']} split {s['split']} yielded no examples")
    return out


def _loss(config, params, examples, batch_size: int, quiet: bool) -> dict:
    """Teacher-forced loss through the model's loss (`seq2seq.EncoderDecoderModel.evaluate`), the numbers the
    trainer's periodic eval reports for the same examples."""
    from tqdm import tqdm

    from gqa_uptrain.evaluate import loss_metrics
    from gqa_uptrain.seq2seq import EncoderDecoderModel, batches_from_pairs
    batches = batches_from_pairs([(e["inputs"], e["targets"]) for e in examples], batch_size)
    sums = EncoderDecoderModel(config).evaluate_sums(params, tqdm(batches, desc="loss", unit="batch",
                                                                  disable=quiet, file=sys.stderr))
    return loss_metrics(-sums["cross_entropy"], int(sums["weight"]), int(sums["correct"]))


def run(args: argparse.Namespace) -> int:
    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # before XLA's threads start: no page faults on each call's temp buffers
    from gqa_uptrain import evaluate
    from gqa_uptrain.checkpoint import atomic_write_text, check_tree_finite, load_params
    from gqa_uptrain.cli.infer_cmd import make_generator, vocabulary

    s = _settings(args)
    from gqa_uptrain.cli.outputs import check_input_file, check_output_file
    check_input_file(s["data"], "--data")
    check_output_file(s["output"], args.overwrite)
    check_output_file(args.predictions, args.overwrite, "--predictions")
    span = s["task"] == "gqa_span_corruption"
    metrics = evaluate.parse_metric_names(s["metrics"] or ("loss" if span else "loss,rouge,bleu,em_f1"))
    ckpt = load_params(s["checkpoint"], args.step)
    check_tree_finite(ckpt.params, s["checkpoint"], args.allow_nonfinite)
    vocab = vocabulary(args)
    examples = _examples(s, vocab)
    gen, batch_size = make_generator(args, ckpt.config, ckpt.params, vocab,
                                     {k: s[k] for k in ("method", "max_input_length", "max_decode_length",
                                                        "batch_size")})
    results: dict = {}
    if "loss" in metrics:
        results.update(_loss(ckpt.config, ckpt.params, examples, batch_size, args.quiet))
    text_metrics = [m for m in metrics if m != "loss"]
    predictions = None
    if text_metrics or args.predictions:
        predictions = _decode_examples(gen, examples, batch_size, args.quiet)
        results.update(evaluate.compute_metrics(text_metrics, predictions, [e["references"] for e in examples]))
    source = s["task"] or s["data"]
    print(evaluate.format_table(results, f"{source} ({len(examples)} examples, {gen.method} decoding, "
                                         f"checkpoint {s['checkpoint']})"))
    report = {"checkpoint": str(s["checkpoint"]), "step": ckpt.step, "source": source, "split": s["split"],
              "num_examples": len(examples), "decoding": {"method": gen.method,
                                                          "max_decode_length": gen.max_decode_length},
              "model": ckpt.config.to_dict(), "metrics": results}
    if s["output"]:
        atomic_write_text(s["output"], json.dumps(report, indent=2) + "\n")
        print(f"wrote {s['output']}", file=sys.stderr)
    if args.predictions and predictions is not None:
        atomic_write_text(args.predictions, "".join(
            json.dumps({"input": e["input_text"], "prediction": pr, "reference": e["references"]}, ensure_ascii=False)
            + "\n" for e, pr in zip(examples, predictions)))
    return 0


def _decode_examples(gen, examples, batch_size: int, quiet: bool) -> list[str]:
    """Greedy/sample/beam outputs for pre-tokenised examples, batched by input length, in example order."""
    from tqdm import tqdm

    from gqa_uptrain.decode import pad_batch
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["inputs"]))
    outputs = [""] * len(examples)
    with tqdm(total=len(examples), desc="decode", unit="ex", disable=quiet, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            enc = pad_batch([examples[i]["inputs"] for i in idx], gen.max_input_length)
            for i, text in zip(idx, gen.decode_tokens(gen.generate_tokens(enc))):
                outputs[i] = text
            bar.update(len(idx))
    return outputs
