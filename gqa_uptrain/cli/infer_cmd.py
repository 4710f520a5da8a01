"""gqa-uptrain infer: batched text generation from a checkpoint with the KV cache."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "Generate outputs for text inputs with the KV cache (greedy, sampling or beam search)"
DESCRIPTION = HELP + """.

Reads one input per line (plain text) or JSONL records with an "inputs" field, writes JSONL
{"input": ..., "output": ...} in input order. Inputs are tokenised with the bundled SentencePiece vocabulary
(or --vocab), EOS appended, truncated to --max_input_length, and batched by similar length.

Examples:
  gqa-uptrain infer --checkpoint /tmp/gqa8 --input questions.txt --output answers.jsonl
  echo "define: harbor | example: the ship reached the harbor" | gqa-uptrain infer --checkpoint /tmp/gqa8 --input -
  gqa-uptrain infer --checkpoint /tmp/run --input in.txt --method beam --num_beams 4 --alpha 0.6"""


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding flags shared by infer and eval."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--method", choices=("greedy", "sample", "beam"), default=None,
                   help="decoding method (default greedy)")
    g.add_argument("--max_input_length", type=int, default=None, help="truncate inputs to this many tokens "
                   "(EOS included; default 512)")
    g.add_argument("--max_decode_length", type=int, default=None, help="generate at most this many tokens "
                   "(EOS included; default 64)")
    g.add_argument("--batch_size", type=int, default=None, help="examples per batch (default 16)")
    g.add_argument("--temperature", type=float, default=1.0, help="sample: softmax temperature (0 = greedy)")
    g.add_argument("--top_k", type=int, default=0, help="sample: keep the k most likely tokens (0 = all)")
    g.add_argument("--top_p", type=float, default=1.0, help="sample: nucleus mass to keep (1 = all)")
    g.add_argument("--seed", type=int, default=0, help="sample: random seed")
    g.add_argument("--num_beams", type=int, default=4, help="beam: beam width")
    g.add_argument("--alpha", type=float, default=0.6, help="beam: length penalty exponent, ((5+len)/6)**alpha")
    g.add_argument("--vocab", default=None, metavar="SPM_MODEL",
                   help="SentencePiece model to use instead of the bundled vocabulary")
    g.add_argument("--extra_ids", type=int, default=100, help="sentinel ids appended to --vocab (default 100)")
    g.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default latest)")
    from gqa_uptrain.cli.common import add_progress_argument
    add_progress_argument(g, "--quiet", dest="quiet")
    g.add_argument("--allow-nonfinite", action="store_true",
                   help="use the checkpoint even if parameters hold NaN/Inf (reported either way; refused by default)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="converted checkpoint dir or training MODEL_DIR (see gqa_uptrain.checkpoint)")
    parser.add_argument("--input", required=True, metavar="FILE|-",
                        help="text file (one input per line), .jsonl with an 'inputs' field, or - for stdin")
    parser.add_argument("--output", default="-", metavar="FILE|-", help="JSONL output (default stdout)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_decoding_arguments(parser)


def vocabulary(args: argparse.Namespace):
    if args.vocab:
        from gqa_uptrain.tf_quiet import seqio  # via tf_quiet: a plain import prints TF start-up lines
        import pathlib
        if not pathlib.Path(args.vocab).exists():
            raise FileNotFoundError(f"vocabulary {args.vocab} does not exist")
        return seqio.SentencePieceVocabulary(args.vocab, extra_ids=args.extra_ids)
    from gqa_uptrain.data import bundled_vocabulary
    return bundled_vocabulary()


def make_generator(args: argparse.Namespace, config, params, vocab, defaults=None):
    """A decode.Generator from the decoding flags (flags left at None take `defaults`, then built-ins)."""
    from gqa_uptrain.decode import Generator
    d = {"method": "greedy", "max_input_length": 512, "max_decode_length": 64, "batch_size": 16, **(defaults or {})}
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    for name in ("max_input_length", "max_decode_length", "batch_size"):
        if pick(name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {pick(name)}")
    gen = Generator(config, params, vocab, max_input_length=pick("max_input_length"),
                    max_decode_length=pick("max_decode_length"), method=pick("method"),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                    alpha=args.alpha, seed=args.seed)
    return gen, pick("batch_size")


def generate_all(gen, texts: list[str], batch_size: int, quiet: bool, desc: str = "infer") -> list[str]:
    """Decode every text, batching inputs of similar token length together; results in input order."""
    from tqdm import tqdm
    lengths = [len(gen.vocabulary.encode(t)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(texts)
    with tqdm(total=len(texts), desc=desc, unit="ex", disable=quiet, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            for i, out in zip(idx, gen.generate([texts[i] for i in idx])):
                outputs[i] = out
            bar.update(len(idx))
    return outputs


def _read_inputs(path: str) -> list[str]:
    """One input per line of a text file (or stdin), or the 'inputs' field of each JSONL record."""
    from gqa_uptrain import jsonl
    from gqa_uptrain.errors import UserError
    if path != "-" and jsonl.is_jsonl(path):
        texts = [str(obj["inputs"]) for _, obj in jsonl.read_jsonl(path, ("inputs",))]
    else:
        texts = [line for _, line in jsonl.read_lines(path)]
    if not texts:
        raise UserError(f"{'stdin' if path == '-' else path} holds no inputs")
    return texts


def run(args: argparse.Namespace) -> int:
    from gqa_uptrain.checkpoint import atomic_write_text, check_tree_finite, load_params
    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # before XLA's threads start: no page faults on each call's temp buffers

    from gqa_uptrain.cli.outputs import check_input_file, check_output_file
    check_input_file(args.input, "--input")
    check_output_file(args.output, args.overwrite)
    texts = _read_inputs(args.input)
    ckpt = load_params(args.checkpoint, args.step)
    check_tree_finite(ckpt.params, args.checkpoint, args.allow_nonfinite)
    gen, batch_size = make_generator(args, ckpt.config, ckpt.params, vocabulary(args))
    outputs = generate_all(gen, texts, batch_size, args.quiet)
    records = "".join(json.dumps({"input": t, "output": o}, ensure_ascii=False) + "\n"
                      for t, o in zip(texts, outputs))
    if args.output == "-":
        sys.stdout.write(records)
    else:
        atomic_write_text(args.output, records)
        print(f"wrote {len(records.splitlines())} outputs to {args.output}", file=sys.stderr)
    return 0
