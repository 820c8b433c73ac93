"""Curve helpers shared by the metrics (choosing the confidence of best F1) and the plots (the mean curve).

Kept apart so that utils/metrics.py and utils/plots.py need not import each other.
"""
from __future__ import annotations

import numpy as np

def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter y with a window of fraction f of its length, padding the ends with edge values."""
    nf = round(len(y) * f * 2) // 2 + 1  # odd window so the output stays aligned with the input
    pad = np.ones(nf // 2)
    yp = np.concatenate((pad * y[0], y, pad * y[-1]))
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")
