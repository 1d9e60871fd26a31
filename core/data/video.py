"""The one in-memory video record every loader and generator returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Background segments carry one of these labels in every dataset we read.
BACKGROUND_LABELS = frozenset({"0", "SIL", "background"})


def is_background(label: str) -> bool:
    return str(label) in BACKGROUND_LABELS


@dataclass(frozen=True)
class Video:
    """A video as features plus its segment annotation.

    `times` has exactly the keys of the released format: `step` (labels), `start_frame` and
    `end_frame` (inclusive feature-frame indices, contiguous, covering 0..T-1) and `name`.
    """

    name: str
    task: str
    features: np.ndarray  # (T, D_in) float32
    times: dict[str, Any]

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])
