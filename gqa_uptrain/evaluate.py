"""Task metrics on decoded text, and reading seq2seq evaluation files. No model code here.

Metrics (all reported on a 0-100 scale):
  rouge   ROUGE-1 / ROUGE-2 / ROUGE-L F-measure, `rouge_score` with the Porter stemmer, averaged over examples
          (the paper's summarisation columns are ROUGE-1);
  bleu    sacrebleu corpus BLEU with its default 13a tokenisation (the paper's WMT column);
  em_f1   SQuAD-style exact match and token F1 after normalisation (lowercase, drop punctuation and the articles
          a/an/the, collapse whitespace), max over references (the paper's TriviaQA column is F1).
Each example may have one reference (str) or several (list of str).
"""
from __future__ import annotations

import collections
import math
import pathlib
import re
import string
from typing import Iterable, Mapping, Sequence, Union

Reference = Union[str, Sequence[str]]
METRICS = ("rouge", "bleu", "em_f1")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def _as_lists(references: Sequence[Reference]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check_lengths(predictions: Sequence[str], references: Sequence[Reference]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")


# ----------------------------------------------------------------------------------------- SQuAD EM / F1


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (multiset overlap)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1; one empty: 0
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def em_f1(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """{'exact_match', 'f1'} x 100, each the mean over examples of the max over that example's references."""
    _check_lengths(predictions, references)
    refs = _as_lists(references)
    em = [max(exact_match(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    f1 = [max(token_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


# ------------------------------------------------------------------------------------------ ROUGE / BLEU


def rouge(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """{'rouge1', 'rouge2', 'rougeL'}: mean F-measure x 100 (best reference per example), stemmed."""
    from rouge_score import rouge_scorer
    _check_lengths(predictions, references)
    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, _as_lists(references)):
        scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100 * v / len(predictions) for t, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """{'bleu'}: sacrebleu corpus BLEU (13a tokenisation, exponential smoothing); all examples need the same
    number of references."""
    import sacrebleu
    _check_lengths(predictions, references)
    refs = _as_lists(references)
    n = {len(r) for r in refs}
    if len(n) != 1:
        raise ValueError(f"corpus BLEU needs the same number of references per example, got counts {sorted(n)}")
    streams = [[r[i] for r in refs] for i in range(n.pop())]
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), streams).score)}


_METRIC_FNS = {"rouge": rouge, "bleu": bleu, "em_f1": em_f1}


def parse_metric_names(spec: str | Iterable[str]) -> list[str]:
    """'rouge,bleu' -> ['rouge', 'bleu'] with a clear error for unknown names ('loss' is also accepted)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in (*METRICS, "loss")]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join((*METRICS, 'loss'))}")
    return names


def compute_metrics(names: Iterable[str], predictions: Sequence[str],
                    references: Sequence[Reference]) -> dict[str, float]:
    """Run the named text metrics (see METRICS) and merge their results into one flat dict."""
    out: dict[str, float] = {}
    for name in parse_metric_names(names):
        if name != "loss":
            out.update(_METRIC_FNS[name](predictions, references))
    return out


def loss_metrics(sum_log_prob: float, num_tokens: int, num_correct: int) -> dict[str, float]:
    """Teacher-forced scores from sums over target tokens: mean cross-entropy (nats/token), perplexity and
    token accuracy x 100."""
    if num_tokens <= 0:
        raise ValueError("no target tokens to score")
    loss = -sum_log_prob / num_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": 100 * num_correct / num_tokens}


# ------------------------------------------------------------------------------------------- reporting


def format_table(results: Mapping[str, float], title: str = "") -> str:
    """Two-column text table of metric -> value (floats with 2 decimals)."""
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    width = max([len("metric")] + [len(k) for k, _ in rows])
    vwidth = max([len("value")] + [len(v) for _, v in rows])
    lines = ([title] if title else []) + [f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}",
                                          f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{k.ljust(width)}  {v.rjust(vwidth)}" for k, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- input files


def _seq2seq_example(obj: dict, where: str, inputs_key: str, targets_key: str) -> tuple[str, Reference]:
    """One JSONL record -> (inputs, reference or references); anything else names the line and the value."""
    inputs, target = obj[inputs_key], obj[targets_key]
    if not isinstance(inputs, str):
        raise ValueError(f"{where}: {inputs_key!r} must be a string, got {inputs!r}"[:200])
    if isinstance(target, str):
        return inputs, target
    if isinstance(target, list) and target and all(isinstance(t, str) for t in target):
        return inputs, list(target)
    raise ValueError(f"{where}: {targets_key!r} must be a string or a non-empty list of strings, got {target!r}"[:200])


def read_seq2seq_file(path: str | pathlib.Path, inputs_key: str = "inputs",
                      targets_key: str = "targets") -> list[tuple[str, Reference]]:
    """Examples from JSONL ({"inputs": ..., "targets": str or [str, ...]}) or TSV (inputs<TAB>targets[<TAB>more
    references]). `.gz` files are read transparently. Blank lines are skipped."""
    from gqa_uptrain import jsonl
    path = pathlib.Path(path)
    stem = path.name.removesuffix(".gz")
    if path.exists() and not jsonl.is_jsonl(stem) and not stem.endswith((".tsv", ".txt")):
        raise ValueError(f"{path}: unknown format; use .jsonl (fields {inputs_key!r}, {targets_key!r}) or .tsv")
    keys = (inputs_key, targets_key)
    if jsonl.is_jsonl(stem):
        examples = [_seq2seq_example(obj, where, *keys)
                    for where, obj in jsonl.read_jsonl(path, keys, what="evaluation file")]
    else:
        examples = []
        for lineno, line in jsonl.read_lines(path, what="evaluation file"):
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected inputs<TAB>targets, found no tab")
            examples.append((parts[0], parts[1] if len(parts) == 2 else parts[1:]))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples
