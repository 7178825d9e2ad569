"""Student-t quantiles without scipy (exact series + bisection), for few-shot confidence intervals when scipy is
not installed."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["t_quantile"]


def _t_central_probability(theta: float, df: int) -> float:
    """P(|T_df| <= sqrt(df) * tan(theta)) for integer df, by the finite series of Abramowitz & Stegun 26.7.3."""
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        i = np.arange(1, (df - 1) // 2)
        series = cos * (1.0 + np.cumprod(2.0 * i / (2.0 * i + 1.0) * cos * cos).sum())
        return 2.0 / math.pi * (theta + sin * series)
    i = np.arange(1, df // 2)
    return sin * (1.0 + np.cumprod((2.0 * i - 1.0) / (2.0 * i) * cos * cos).sum())


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):  # bisection on the normal CDF: exact to double precision, no table needed
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile for p in (0.5, 1) without scipy (used only when scipy is missing)."""
    if df > 10_000:  # Cornish-Fisher expansion (A&S 26.7.5): error far below 1e-12 at this df
        z = _normal_quantile(p)
        return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
                + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))
    central = 2.0 * p - 1.0
    lo, hi = 0.0, math.pi / 2
    for _ in range(100):  # the central probability grows with theta; bisect on theta in (0, pi/2)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_central_probability(mid, df) < central else (lo, mid)
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))
