"""Memory policies: which tracked frames a bank keeps and which of them a frame reads.

    base.py              Entry, Query, MemoryRead, MemoryPolicy (the interface)
    fifo.py              SAM 2 / SAM 2.1 exactly: the most recent frames
    self_sorting.py      MedSAM-2: confidence gate, dissimilarity + confidence, top-K kept sorted
    medsam2_released.py  the rule of the released MedSAM-2 2D code

`make_policy(config, tracker_config)` builds the one `tracker_config.memory_policy` names;
`register_policy(name, cls)` adds a researcher's own; `with_knobs(policy, state, **values)` sets the
numeric knobs a policy keeps traced (a sweep vmaps over them).
"""

from medsam2_jax.tracker.policies.base import Entry, MemoryPolicy, MemoryRead, Query, with_knobs
from medsam2_jax.tracker.policies.fifo import Fifo
from medsam2_jax.tracker.policies.medsam2_released import Medsam2Released
from medsam2_jax.tracker.policies.self_sorting import SelfSorting

REGISTRY: dict = {"fifo": Fifo, "self_sorting": SelfSorting, "medsam2_released": Medsam2Released}


def register_policy(name: str, cls) -> None:
    """Make `get_tracker_config(memory_policy=name)` build `cls(config, tracker_config)`."""
    REGISTRY[name] = cls


def make_policy(config, tracker_config) -> MemoryPolicy:
    name = tracker_config.memory_policy
    if name not in REGISTRY:
        raise ValueError(f"memory_policy must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name](config, tracker_config)


__all__ = ["Entry", "Fifo", "Medsam2Released", "MemoryPolicy", "MemoryRead", "Query", "REGISTRY", "SelfSorting",
           "make_policy", "register_policy", "with_knobs"]
