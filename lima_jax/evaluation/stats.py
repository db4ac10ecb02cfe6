"""Bootstrap confidence intervals over prompts: the prompts are resampled with replacement and
the statistic recomputed; the interval is the middle `level` of those values. Seeded, so a
summary is reproducible."""

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], np.ndarray] | None = None,
                 resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(low, high) of `statistic` (default: the mean) over `resamples` resamplings of `values`
    (one value per prompt). `statistic` maps a (resamples, n) array to (resamples,)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = []
    for chunk in _chunks(resamples, max(1, 4_000_000 // values.size)):  # bounded memory for large files
        sample = values[rng.integers(0, values.size, size=(chunk, values.size))]
        stats.append(statistic(sample) if statistic else sample.mean(axis=1))
    low, high = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _chunks(total: int, size: int):
    while total > 0:
        yield min(total, size)
        total -= size


def share_with_ci(outcomes: Sequence[str], which: str, **kwargs) -> dict:
    """The share of `which` among the outcomes, with its bootstrap interval."""
    hits = np.array([o == which for o in outcomes], dtype=np.float64)
    low, high = bootstrap_ci(hits, **kwargs)
    return {"share": float(hits.mean()) if hits.size else float("nan"), "ci": [low, high]}


def mean_with_ci(values: Sequence[float], **kwargs) -> dict:
    array = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(array, **kwargs)
    return {"mean": float(array.mean()) if array.size else float("nan"), "ci": [low, high]}
