"""Golden parameter trees: names, shapes, dtypes and logical axes of every published size (and GQA/MQA variants).

The parameter tree is the checkpoint contract (T5X names, HF name table, sharding rules), so any change to it must
show up as a reviewed diff of tests/golden/*.json. To accept an intended change, regenerate the files with
`GQA_UPTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_params.py` and commit the diff.
"""
from __future__ import annotations

import json
import os
import pathlib

import flax.linen as nn
import jax
import pytest

from gqa_uptrain import gin_utils, model

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("GQA_UPTRAIN_UPDATE_GOLDEN") == "1"

# (golden file stem, model gin file, extra bindings). Every published size as MHA; GQA and MQA where the tree differs.
CASES = [(size, f"models/t5_1_1/{size}.gin", []) for size in ("tiny", "small", "base", "large", "xl", "xxl")] + [
    ("tiny_mqa", "models/t5_1_1/tiny.gin", ["NUM_KV_HEADS = 1"]),
    ("xxl_gqa8", "models/t5_1_1/xxl.gin", ["NUM_KV_HEADS = 8"]),
]


def param_table(gin_file: str, bindings: list[str]) -> dict:
    """{'config': ModelConfig fields, 'params': {name: {'shape', 'dtype', 'axes'}}} from eval_shape (no allocation)."""
    gin_utils.parse_gin([gin_file], bindings)
    cfg = gin_utils.model_config_from_gin()
    boxed = model.abstract_params(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    params = {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        params[name] = {"shape": list(leaf.value.shape), "dtype": str(leaf.value.dtype), "axes": list(leaf.names)}
    return {"config": cfg.to_dict(), "params": dict(sorted(params.items()))}


def _dump(table: dict) -> str:
    # One parameter per line, so a changed parameter is a one-line diff.
    lines = ['{', f'  "config": {json.dumps(table["config"], sort_keys=True)},', '  "params": {']
    items = [f'    {json.dumps(k)}: {json.dumps(v)}' for k, v in table["params"].items()]
    lines.append(",\n".join(items))
    lines += ['  }', '}']
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("stem,gin_file,bindings", CASES, ids=[c[0] for c in CASES])
def test_parameter_tree_matches_golden(stem, gin_file, bindings):
    table = param_table(gin_file, bindings)
    path = GOLDEN_DIR / f"{stem}.json"
    if UPDATE:
        path.write_text(_dump(table))
    assert path.exists(), f"{path} missing: run with GQA_UPTRAIN_UPDATE_GOLDEN=1 to create it"
    golden = json.loads(path.read_text())
    assert table["config"] == golden["config"], f"{stem}: ModelConfig differs from {path.name}"
    got, want = table["params"], golden["params"]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    changed = [f"{k}: {want[k]} -> {got[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    assert not (missing or extra or changed), (
        f"{stem}: parameter tree differs from {path.name}\n  missing: {missing[:10]}\n  extra: {extra[:10]}\n"
        f"  changed: {changed[:10]}\n(intended? regenerate with GQA_UPTRAIN_UPDATE_GOLDEN=1 and commit the diff)")


def test_golden_files_have_a_case():
    """A stale golden file (its case removed) would silently stop guarding anything."""
    stems = {c[0] for c in CASES}
    assert {p.stem for p in GOLDEN_DIR.glob("*.json")} == stems


def test_golden_counts_match_published_sizes():
    """The golden trees themselves add up to T5.1.1's published parameter counts (independent of model.py)."""
    import math
    published = {"small": 77.0e6, "base": 247.6e6, "large": 783.2e6, "xl": 2.85e9, "xxl": 11.1e9}
    for stem, count in published.items():
        params = json.loads((GOLDEN_DIR / f"{stem}.json").read_text())["params"]
        total = sum(math.prod(p["shape"]) for p in params.values())
        assert abs(total - count) / count < 0.01, (stem, total)
