"""The one sign convention between the paper and open_clip (defined here and nowhere else).

    paper:      logits = t * (s - b_rel)
    open_clip:  logits = t * s + logit_bias        =>   logit_bias = -t * b_rel,  b_rel = -logit_bias / t

t is exp(logit_scale), already exponentiated. Both functions take tensors or Python floats.

>>> rel_bias_from_logit_bias(-10.0, 10.0)
1.0
>>> logit_bias_from_rel_bias(1.0, 10.0)
-10.0
"""
from __future__ import annotations


def rel_bias_from_logit_bias(logit_bias, t):
    """b_rel = -logit_bias / t (open_clip adds the bias, the paper subtracts it)."""
    return -logit_bias / t


def logit_bias_from_rel_bias(rel_bias, t):
    """logit_bias = -t * b_rel."""
    return -t * rel_bias
