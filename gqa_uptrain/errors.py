"""The error type for input a user can fix (a flag, a file, a key, a shape), as opposed to a bug.

Validation points raise `UserError` (or a ValueError subclass of their own, e.g. `config.ConfigError`) with one line
naming the file, key, shape or value. The CLI prints such errors as that one line; anything else keeps its traceback
(`gqa_uptrain.cli.errors.one_line` decides). It subclasses ValueError so library callers that catch ValueError
for bad input keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input, described in one line that names what to fix."""
