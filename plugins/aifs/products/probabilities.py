"""Quintile probabilities of an ensemble against the climatology's quintile edges.

Each member's period value falls in one quintile by the competition's own rule
(``AI_WQ_package.forecast_evaluation.conditional_obs_probs``: below the 0.2 edge, between edges with
lower <= x < upper, at or above the 0.8 edge; an empty bin where two edges are equal); the
probability of a quintile is the fraction of members in it. Where all four edges are equal (a
desert's zero precipitation) the package masks the point; there a value below the edges is the
first quintile and any other the fifth, so every point's probabilities still sum to one.
"""

from __future__ import annotations

import numpy as np


def quintile_probabilities(members: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """members (n, 121, 240), edges (4, 121, 240) -> probabilities (5, 121, 240) in [0, 1], summing to 1."""
    import xarray as xr
    from AI_WQ_package.forecast_evaluation import conditional_obs_probs

    n = members.shape[0]
    if n == 0:
        raise ValueError("no members")
    bounds = xr.DataArray(edges, dims=("quantile", "latitude", "longitude"))
    all_equal = edges.min(axis=0) == edges.max(axis=0)
    counts = np.zeros((5,) + edges.shape[1:], dtype=np.int64)
    for values in members:
        crit = conditional_obs_probs(xr.DataArray(values, dims=("latitude", "longitude")), bounds).values
        crit = np.nan_to_num(crit, nan=0.0).astype(bool)
        below = values < edges[0]
        crit[0] |= all_equal & below
        crit[4] |= all_equal & ~below
        counts += crit
    probs = counts / float(n)
    total = probs.sum(axis=0)
    if not np.allclose(total, 1.0):
        bad = np.argwhere(~np.isclose(total, 1.0))[0]
        raise ValueError(f"quintile probabilities do not sum to 1 at grid index {tuple(bad)}: {total[tuple(bad)]}")
    return probs
