"""The named result of a validation run: what val.py prints, train.py logs and --evolve ranks by."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from utils.sizes import SizeMetrics

# results.csv column -> ValResult field, in the file's column order (after the three train losses)
CSV_FIELDS = {
    "metrics/precision": "precision", "metrics/recall": "recall", "metrics/mAP_0.5": "map50",
    "metrics/mAP_0.5:0.95": "map", "metrics/APs": "aps", "metrics/APm": "apm", "metrics/APl": "apl",
    "val/box_loss": "box_loss", "val/obj_loss": "obj_loss", "val/cls_loss": "cls_loss",
}
FITNESS_WEIGHTS = {"map50": 0.1, "map": 0.9}  # YOLOv5's: 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95


@dataclass
class ValResult:
    """Mean precision/recall, mAPs, COCO area APs and validation losses; per-class mAP and timings."""

    precision: float = 0.0
    recall: float = 0.0
    map50: float = 0.0
    map: float = 0.0  # mAP@0.5:0.95
    aps: float = 0.0  # COCO small/medium/large-object AP (0 where a range has no objects)
    apm: float = 0.0
    apl: float = 0.0
    box_loss: float = 0.0
    obj_loss: float = 0.0
    cls_loss: float = 0.0
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-class mAP@0.5:0.95 (mean where no labels)
    speed: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pre-process, inference, NMS ms per image
    sizes: SizeMetrics | None = None  # AP/AR per --sizes bin (None: not evaluated)

    @property
    def fitness(self) -> float:
        return fitness_of({k: getattr(self, k) for k in FITNESS_WEIGHTS})

    def csv_values(self) -> dict[str, float]:
        """The results.csv columns this result fills, by name (then its --sizes bins' columns, if any)."""
        out = {col: float(getattr(self, f)) for col, f in CSV_FIELDS.items()}
        return {**out, **(self.sizes.csv_values() if self.sizes is not None else {})}


def fitness_of(values: dict[str, float]) -> float:
    """Fitness from ValResult field values given by name (--evolve ranks its evolve.csv history with this)."""
    return sum(w * float(values[k]) for k, w in FITNESS_WEIGHTS.items())
