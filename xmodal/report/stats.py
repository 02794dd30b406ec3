"""Spread over repeated runs (seeds): what every report table and figure shows."""

from __future__ import annotations

import math


def mean_and_error(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error of the mean (both 0 for one value).

    Raises:
        ValueError: No values.
    """
    count = len(values)
    if not count:
        raise ValueError("mean_and_error of no values")
    mean = sum(values) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else 0.0
    return mean, std, std / math.sqrt(count)
