"""The sweep's statistics, fixed before any run: paired t-intervals and the collapse rule.

- A variant is compared with the baseline through per-seed paired differences
  d_s = score(variant, seed s) - score(baseline, seed s), over the seeds both finished.
- The 95% interval is Student's t on those differences: mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n).
- A variant "helps" only if the interval lies above 0, "hurts" only if it lies below 0.
- A run "collapsed" when its perception KL rose 10x (the highest mean over `window`
  consecutive steps, over the mean of its first `window` steps) and its held-out accuracy fell
  >= 5 points from its peak (peak over the run's evaluations minus the final evaluation).

Nothing here depends on scipy: the t quantile comes from the regularized incomplete beta
function (continued fraction) and bisection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95
KL_FACTOR = 10.0
DROP_POINTS = 5.0
WINDOW = 5


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_sd needs at least one value")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


@dataclass(frozen=True)
class Interval:
    """A paired comparison: n differences, their mean, sd and the t-interval [lo, hi]."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        """"helps" (interval above 0), "hurts" (below 0), "no detectable difference", or
        "too few seeds" (n < 2: no interval)."""
        if self.n < 2 or math.isnan(self.lo):
            return "too few seeds"
        if self.lo > 0:
            return "helps"
        if self.hi < 0:
            return "hurts"
        return "no detectable difference"


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> Interval:
    """Student's t interval of the mean of `diffs` (nan bounds for fewer than 2 values)."""
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    if n < 2:
        return Interval(n, mean, sd, float("nan"), float("nan"), level)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, level)


def paired_differences(variant: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """variant[s] - baseline[s] over the seeds both have, in seed order."""
    return [variant[s] - baseline[s] for s in sorted(set(variant) & set(baseline))]


def paired_interval(variant: Mapping[int, float], baseline: Mapping[int, float],
                    level: float = LEVEL) -> Interval | None:
    """The paired t-interval of variant - baseline by seed; None when no seed is shared."""
    diffs = paired_differences(variant, baseline)
    return t_interval(diffs, level) if diffs else None


@dataclass(frozen=True)
class Collapse:
    """The collapse signals of one run."""

    kl_initial: float
    kl_peak: float
    kl_final: float
    kl_ratio: float
    eval_peak: float
    eval_final: float
    eval_drop_points: float
    collapsed: bool


def collapse(kl_per_step: Sequence[float], eval_scores: Sequence[float], *, window: int = WINDOW,
             kl_factor: float = KL_FACTOR, drop_points: float = DROP_POINTS) -> Collapse:
    """Apply the collapse rule to a run's per-step perception KL and its held-out scores
    (fractions in [0, 1], in step order, the last one final). The KL ratio is the peak of its
    `window`-step moving mean over the first window: a run whose KL blew up and then fell back
    (e.g. to 0 once its outputs stopped depending on the image) still counts as having risen."""
    if not kl_per_step or not eval_scores:
        raise ValueError("collapse needs at least one KL value and one evaluation")
    w = max(1, min(window, len(kl_per_step)))
    means = [sum(kl_per_step[i:i + w]) / w for i in range(len(kl_per_step) - w + 1)]
    first, peak_kl, last = means[0], max(means), means[-1]
    ratio = peak_kl / first if first > 0 else float("inf")
    peak, final = max(eval_scores), eval_scores[-1]
    drop = 100.0 * (peak - final)
    collapsed = ratio >= kl_factor and drop >= drop_points
    return Collapse(first, peak_kl, last, ratio, peak, final, drop, collapsed)
