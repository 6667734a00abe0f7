"""Where an object ends: a learned stop rule for propagation through a volume.

SAM 2's tracker says "no object" through its object-score head. The demo model's head does not
fall where a structure ends (it stays high on every slice; trained to stop, it decayed with the
distance from the prompt instead), so its masks run on through the volume. A `StopRule` reads,
per tracked slice:

  similarity     cosine between the object's mask-pooled image features on this slice and on the
                 prompted slice (`tracker.step.object_embedding`): does the region still look like
                 the structure the user boxed?
  dist_width, dist_height, dist_diameter
                 the distance from the prompted slice in mm over the prompted mask's width,
                 height and equivalent diameter (in mm): an extent prior, learned from structures
                 with known ends, that a structure reaches about as far out of plane as its
                 in-plane size says;
  dist_mm        the distance in mm;

and gives a presence probability (logistic). Moving out from a prompted slice, the object ends
at the first run of `run` slices below `threshold`: those slices and every later one of that
pass are "no object", and a pass in which every object has ended stops computing.

The extent terms are a prior about shape, not evidence from the image: a structure far longer
out of plane than across (a vessel, an elongated lesion) will be cut short. A rule is fitted by
`scripts/fit_stop_rule.py` on structures the model trained on, with a given memory policy, and is
written into the checkpoint's manifest (`inference.stop`); `segment_volume(stop=None)` tracks
to the volume's ends as SAM 2 does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FEATURES = ("similarity", "dist_width", "dist_height", "dist_diameter", "dist_mm")


@dataclasses.dataclass(frozen=True)
class StopRule:
    weights: tuple[float, ...]  # one per FEATURES
    bias: float
    threshold: float = 0.5  # presence probability below which a slice counts as absent
    run: int = 1  # this many absent slices in a row end the object
    policy: str | None = None  # the memory policy the rule was fitted with (informative)

    def __post_init__(self):
        if len(self.weights) != len(FEATURES):
            raise ValueError(f"a stop rule has {len(FEATURES)} weights ({', '.join(FEATURES)}), "
                             f"got {len(self.weights)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"stop threshold {self.threshold} must be in (0, 1)")
        if self.run < 1:
            raise ValueError(f"stop run {self.run} must be at least 1 slice")

    def presence(self, features: np.ndarray) -> np.ndarray:
        """(..., len(FEATURES)) -> (...) probability that the object is on the slice."""
        z = np.asarray(features, np.float64) @ np.asarray(self.weights, np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": [float(w) for w in self.weights], "bias": float(self.bias),
                "threshold": float(self.threshold), "run": int(self.run), "policy": self.policy}

    @classmethod
    def from_dict(cls, d: dict) -> StopRule:
        if list(d.get("features", FEATURES)) != list(FEATURES):
            raise ValueError(f"stop rule features {d.get('features')} are not this version's {list(FEATURES)}")
        return cls(tuple(float(w) for w in d["weights"]), float(d["bias"]), float(d.get("threshold", 0.5)),
                   int(d.get("run", 1)), d.get("policy"))


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a prompted slice says about its object: the pooled features and the mask's extent."""

    embedding: np.ndarray  # (C,)
    width_mm: float
    height_mm: float
    diameter_mm: float


def reference(embedding: np.ndarray, mask: np.ndarray, spacing: tuple[float, float]) -> Reference:
    """The prompted slice's `Reference` from its embedding and its (h, w) predicted mask; `spacing`
    is (row, column) mm. An empty mask counts as one pixel."""
    row_mm, col_mm = spacing
    rows, cols = np.nonzero(mask)
    if rows.size:
        height = (rows.max() - rows.min() + 1) * row_mm
        width = (cols.max() - cols.min() + 1) * col_mm
    else:
        height, width = row_mm, col_mm
    area = max(int(rows.size), 1) * row_mm * col_mm
    return Reference(np.asarray(embedding, np.float64), float(width), float(height), float(np.sqrt(4 * area / np.pi)))


def slice_features(ref: Reference, embedding: np.ndarray | None, distance_mm: float) -> np.ndarray:
    """(len(FEATURES),) for a slice `distance_mm` from the prompted one."""
    if embedding is None:
        similarity = 0.0
    else:
        e = np.asarray(embedding, np.float64)
        similarity = float(e @ ref.embedding / (np.linalg.norm(e) * np.linalg.norm(ref.embedding) + 1e-8))
    d = abs(float(distance_mm))
    return np.array([similarity, d / ref.width_mm, d / ref.height_mm, d / ref.diameter_mm, d], np.float64)


def ends(presence: np.ndarray, rule: StopRule) -> int | None:
    """Index into `presence` (slices in tracking order, the prompted one excluded) of the first
    slice the rule removes, or None when the object lasts to the end."""
    low = 0
    for k, p in enumerate(presence):
        low = low + 1 if p < rule.threshold else 0
        if low >= rule.run:
            return k - rule.run + 1
    return None


def kept_slices(features: np.ndarray, prompted: int, rule: StopRule | None) -> np.ndarray:
    """(n,) the slices an object prompted on slice `prompted` keeps under `rule` (all without one),
    from its (n, len(FEATURES)) `Segmentation.slice_features` of a run without a rule: what
    `segment_volume(stop=rule)` gives, computed after the fact (to fit or compare rules)."""
    keep = np.ones(len(features), bool)
    if rule is None:
        return keep
    for order in (list(range(prompted + 1, len(features))), list(range(prompted - 1, -1, -1))):
        end = ends(rule.presence(features[order]), rule) if order else None
        if end is not None:
            keep[order[end:]] = False
    return keep


def fit(features: np.ndarray, present: np.ndarray, *, l2: float = 1e-2, steps: int = 3000,
        learning_rate: float = 0.5) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression of `present` (n,) on `features` (n, F), by gradient
    descent on standardised features: (weights, bias) on the raw features."""
    x, y = np.asarray(features, np.float64), np.asarray(present, np.float64)
    if y.min() == y.max():
        raise ValueError("fitting a stop rule needs slices with and without the object")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    weight = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xn @ w + b)))
        g = (p - y) * weight
        w -= learning_rate * (xn.T @ g / len(y) + l2 * w)
        b -= learning_rate * g.mean()
    return w / sd, float(b - (mu / sd) @ w)


def from_checkpoint(checkpoint=None) -> StopRule | None:
    """The stop rule of a checkpoint folder (its manifest's `inference.stop`), or of the shipped demo
    weights when None; None where there is none. Track with the memory policy it names."""
    from medsam2_jax import weights
    from medsam2_jax.convert.checkpoint import read_manifest

    if checkpoint is None:
        shipped = weights.default_checkpoint()
        found = shipped.inference.get("stop") if shipped is not None else None
    else:
        found = read_manifest(checkpoint).get("inference", {}).get("stop")
    return StopRule.from_dict(found) if found else None
