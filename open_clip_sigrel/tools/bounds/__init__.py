"""How many matched pairs fit in d dimensions as an (m, b_rel)-constellation?

An (m, b_rel)-constellation of N pairs of unit vectors (U_i, V_i) has s_ii >= b_rel + m for every i and
s_ij <= b_rel - m for every i != j (Bangachev et al., arXiv 2509.18552). The package reports

* the feasible region (Thm 3.4, exact): ``region`` (``validate``, ``feasible_region``);
* bounds on A(n, c), the largest spherical code in R^n with all inner products <= c, every one
  rigorous: ``spherical_codes`` (``spherical_code_bounds``, the certified ``delsarte_lp_bound``);
* what both give for constellations: the paper's asymptotic dimensions (Thm 3.5 / Thm 3.3, labelled
  "asymptotic") and rigorous finite-d bounds built on spherical codes (labelled "rigorous"):
  ``constellation`` (``constellation_bounds``).

scipy (the 'research' extra) computes the caps, the Gilbert-Varshamov sums and the LP. Command line:
``open-clip-sigrel bounds --n N --margin M [--rel-bias B] [--dim D] [--json]`` (open_clip_sigrel.cli.bounds).
"""
from open_clip_sigrel.tools.bounds._shared import ASYMPTOTIC, RIGOROUS
from open_clip_sigrel.tools.bounds.constellation import (
    asymptotic_rates,
    code_inner_product,
    constellation_bounds,
    constellation_from_code,
)
from open_clip_sigrel.tools.bounds.region import feasible_region, max_pairs_any_dim, validate
from open_clip_sigrel.tools.bounds.spherical_codes import (
    LP_DEGREE,
    delsarte_lp_bound,
    gegenbauer,
    log_cap_fraction,
    spherical_code_bounds,
)

__all__ = [
    "ASYMPTOTIC", "LP_DEGREE", "RIGOROUS", "asymptotic_rates", "code_inner_product", "constellation_bounds",
    "constellation_from_code", "delsarte_lp_bound", "feasible_region", "gegenbauer", "log_cap_fraction",
    "max_pairs_any_dim", "spherical_code_bounds", "validate",
]
