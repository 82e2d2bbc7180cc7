"""What the bounds modules share: the label every reported number carries, and the float tolerance."""
from __future__ import annotations

RIGOROUS = "rigorous"
ASYMPTOTIC = "asymptotic"
_TOL = 1e-12  # slack for comparisons of inner products (float64 inputs)
# Smallest positive margin the float64 bounds resolve: below it c = 1 - 2m and alpha* sit within _TOL of 1,
# where the tolerant comparisons would turn into false claims ("any number of equal points"): refused.
MIN_MARGIN = 1e-9
