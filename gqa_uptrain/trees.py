"""Parameter trees in their two shapes: nested dicts (what flax modules take) and flat 'a/b/kernel' mappings (what
checkpoints, readers and the converter stream). One rule tells them apart: a mapping is flat when every key is a
string holding '/'; anything else is nested.
"""
from __future__ import annotations

from typing import Any, Mapping

SEP = "/"


def is_flat(params: Mapping[str, Any]) -> bool:
    """True for a non-empty mapping whose keys are all 'a/b/...' paths."""
    return bool(params) and all(isinstance(k, str) and SEP in k for k in params)


def flat_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Flat 'a/b/kernel' view of params; an already flat mapping (possibly lazy) is returned as is."""
    if is_flat(params):
        return params
    from flax import traverse_util
    return traverse_util.flatten_dict(dict(params), sep=SEP)


def nested_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested view of params (reading every tensor of a lazy flat mapping); a nested tree is returned as is."""
    if not is_flat(params):
        return params
    from flax import traverse_util
    return traverse_util.unflatten_dict(dict(params), sep=SEP)
