"""Functional geometry metrics: one formula per function, on tensors, no state."""
from __future__ import annotations


def margin_and_rel_bias(pos, neg):
    """Halved margin and relative bias of a constellation from a positive and a negative similarity.

        m     = (pos - neg) / 2        b_rel = (pos + neg) / 2

    With pos = min_i s_ii and neg = max_{i != j} s_ij this is the paper's (m*, b*_rel) (Bangachev et
    al. 2025; m* > 0 iff the pairs form a constellation); with the means, Tab. 6's mean forms; with
    P5(pos) and P95(neg), Tab. 5's trimmed forms. Works on floats and (batched) tensors alike.

    >>> margin_and_rel_bias(0.9, 0.1)
    (0.4, 0.5)
    """
    return (pos - neg) / 2, (pos + neg) / 2
