"""gqa-uptrain export: our checkpoint -> Hugging Face T5 safetensors."""
from __future__ import annotations

import argparse
import sys

HELP = "Export a checkpoint to Hugging Face T5 (safetensors + config.json)"
DESCRIPTION = """Export a gqa_uptrain checkpoint (converted dir or training MODEL_DIR) to a Hugging Face T5 directory:
model.safetensors, or shards + model.safetensors.index.json above --max-shard-mib (HF T5 names, [out, in] linear weights, relative_attention_bias in block 0 only, explicit untied
lm_head.weight) and config.json (feed_forward_proj=gated-gelu, tie_word_embeddings=false).

MHA models (G = num_heads) load in transformers' T5ForConditionalGeneration and reproduce our logits.
GQA models keep K/V of width G*head_dim and record gqa_encoder_kv_heads / gqa_decoder_self_kv_heads /
gqa_decoder_cross_kv_heads in config.json; stock HF T5 cannot load those shapes (gqa_uptrain can:
`gqa-uptrain convert --source DIR --num-kv-heads G`, or gqa_uptrain.readers.open_source(DIR)).
--expand-kv writes K/V repeated to num_heads heads instead: loads in stock HF T5, same function, no memory saving."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="gqa_uptrain checkpoint: converted dir (params/ + config.json) or training MODEL_DIR")
    parser.add_argument("--step", type=int, default=None, help="training step to export (default: latest)")
    parser.add_argument("--format", default="hf", metavar="FORMAT", help="output format; only 'hf' (default)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--expand-kv", action="store_true",
                        help="repeat GQA K/V heads to num_heads so stock HF T5 loads the model")
    from gqa_uptrain.cli.common import add_progress_argument
    add_progress_argument(parser)
    parser.add_argument("--max-shard-mib", type=float, default=None, metavar="MIB",
                        help="largest safetensors shard in MiB (default 256); bounds export memory; more than one "
                             "shard is written as HF's model-0000i-of-0000n.safetensors + model.safetensors.index.json")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="export even if parameters hold NaN/Inf (reported either way; refused by default)")


def run(args: argparse.Namespace) -> int:
    if args.format != "hf":
        raise ValueError(f"unknown export --format {args.format!r}; only 'hf' is supported")
    from gqa_uptrain.export import export_hf
    out = export_hf(args.checkpoint, args.output, overwrite=args.overwrite, expand_kv=args.expand_kv,
                    step=args.step, show_progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite,
                    **({"max_shard_mib": args.max_shard_mib} if args.max_shard_mib is not None else {}))
    print(f"wrote {out}", file=sys.stderr)
    return 0
