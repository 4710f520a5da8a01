"""gqa_uptrain.trees: one rule for flat ('a/b/kernel') versus nested parameter trees."""
import numpy as np

from gqa_uptrain.trees import flat_params, is_flat, nested_params


def test_one_rule_both_ways():
    nested = {"encoder": {"layers_0": {"kernel": np.ones(2)}}, "token_embedder": {"embedding": np.zeros(3)}}
    flat = flat_params(nested)
    assert set(flat) == {"encoder/layers_0/kernel", "token_embedder/embedding"} and is_flat(flat)
    assert flat_params(flat) is flat  # a (possibly lazy) flat mapping is used as is
    back = nested_params(flat)
    assert back["encoder"]["layers_0"]["kernel"] is nested["encoder"]["layers_0"]["kernel"]
    assert nested_params(nested) is nested
    # Mixed keys are nested (a top-level name without '/'), and empty is not flat.
    assert not is_flat({"a/b": 1, "c": {"d": 2}}) and not is_flat({})
