"""What the bounds modules share: the label every reported number carries, and the float tolerance."""
from __future__ import annotations

RIGOROUS = "rigorous"
ASYMPTOTIC = "asymptotic"
_TOL = 1e-12  # slack for comparisons of inner products (float64 inputs)
