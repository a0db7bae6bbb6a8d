"""Statistics of a paired comparison over a few seeds: mean and sample standard deviation per
arm, the paired t-test on the per-seed differences, and exact tests that need no normality
(sign-flip permutation, sign test) since N is small. Pure numpy/math: scipy is not a dependency.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def mean_sd(x: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with N-1 in the denominator; 0 for one value)."""
    a = np.asarray(x, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(diff: Sequence[float]) -> dict[str, float | int | None]:
    """Paired t-test of H0 "mean difference 0": t = mean(d) / (sd(d) / sqrt(n)), df = n - 1.
    With n < 2 it is undefined (None); with all differences equal, t is 0 (p 1) when they are
    0, else infinite (p 0)."""
    d = np.asarray(diff, np.float64)
    n = len(d)
    if n < 2:
        return {"t": None, "df": n - 1 if n else 0, "p": None}
    m, sd = mean_sd(d)
    t = m / (sd / math.sqrt(n)) if sd > 0.0 else (0.0 if m == 0.0 else math.copysign(math.inf, m))
    p = t_two_sided_p(t, n - 1)
    return {"t": None if math.isinf(t) else t, "df": n - 1, "p": p}


def sign_flip_p(diff: Sequence[float]) -> float | None:
    """Exact two-sided permutation test of paired differences: under H0 each difference's sign
    is a fair coin, so p is the share of the 2^n sign assignments whose |mean| is at least the
    observed one."""
    d = np.asarray(diff, np.float64)
    n = len(d)
    if n == 0:
        return None
    if n > 20:
        raise ValueError(f"sign_flip_p: {n} differences is too many to enumerate (at most 20)")
    observed = abs(d.mean())
    signs = np.asarray(list(itertools.product((1.0, -1.0), repeat=n)))
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def sign_test_p(diff: Sequence[float]) -> float | None:
    """Exact two-sided sign test: zero differences dropped, the count of positive ones against
    Binomial(n, 1/2)."""
    nz = [x for x in diff if x != 0]
    n = len(nz)
    if n == 0:
        return None if not diff else 1.0
    k = sum(x > 0 for x in nz)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def compare_paired(a: Sequence[float], b: Sequence[float]) -> dict[str, object]:
    """Per-arm mean and sd of paired samples `a`, `b` (same seeds, same order) and the tests of
    their differences a - b."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    diff = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    md, sd = mean_sd(diff)
    return {
        "a": {"values": [float(x) for x in a], "mean": ma, "sd": sa},
        "b": {"values": [float(x) for x in b], "mean": mb, "sd": sb},
        "diff": {"values": diff, "mean": md, "sd": sd},
        "paired_t": paired_t(diff),
        "sign_flip_p": sign_flip_p(diff),
        "sign_test_p": sign_test_p(diff),
    }
