"""The feed: one run's model inputs by name, the unit of calibration and evaluation data."""

from __future__ import annotations

import numpy as np

__all__ = ["Feed"]

Feed = dict[str, np.ndarray]
