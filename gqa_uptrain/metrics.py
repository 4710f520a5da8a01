"""Metric writers: one JSON object per line in MODEL_DIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes (the trainer passes `enabled=False` elsewhere). Values are plain Python floats; a record
looks like ``{"step": 100, "split": "train", "loss": 2.31, "learning_rate": 0.001, ...}``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)  # JSON has no NaN/Inf literals


class JsonlWriter:
    """Appends records to a JSONL file, flushing each line so a killed run keeps everything written."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        rec = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalars to `logdir/<split>/events.*` via tf.summary (TensorFlow is already loaded by seqio)."""

    def __init__(self, logdir: str | os.PathLike):
        from gqa_uptrain.tf_quiet import tf
        self._tf = tf
        self._logdir = pathlib.Path(logdir)
        self._writers: dict[str, Any] = {}

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        tf = self._tf
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(str(self._logdir / split))
        with self._writers[split].as_default():
            for k, v in metrics.items():
                try:
                    tf.summary.scalar(k, float(v), step=int(step))
                except (TypeError, ValueError):
                    continue
        self._writers[split].flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()


class MetricWriter:
    """Fans records out to the JSONL and TensorBoard writers; a no-op when `enabled` is False."""

    def __init__(self, model_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self._writers: list[Any] = []
        if enabled:
            self._writers.append(JsonlWriter(pathlib.Path(model_dir) / METRICS_FILE))
            if tensorboard:
                self._writers.append(TensorBoardWriter(pathlib.Path(model_dir) / TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        for w in self._writers:
            w.write(step, metrics, split)

    def close(self) -> None:
        for w in self._writers:
            w.close()


def read_metrics(model_dir: str | os.PathLike, split: str | None = "train") -> list[dict[str, Any]]:
    """Records from MODEL_DIR/metrics.jsonl (optionally one split), in file order."""
    path = pathlib.Path(model_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if split is None or rec.get("split") == split:
                out.append(rec)
    return out


def truncate_metrics(model_dir: str | os.PathLike, step: int) -> int:
    """Drop records after `step` from MODEL_DIR/metrics.jsonl (and a torn last line); returns how many were dropped.

    A resumed run repeats the steps after its checkpoint; without this their records would appear twice. Records
    of `step` itself (its train and eval records) are kept. The file is replaced atomically."""
    path = pathlib.Path(model_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            keep = int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        from gqa_uptrain.checkpoint import atomic_write_text
        atomic_write_text(path, "".join(kept))
    return dropped


def has_record(model_dir: str | os.PathLike, step: int, split: str) -> bool:
    return any(r.get("step") == step for r in read_metrics(model_dir, split))
