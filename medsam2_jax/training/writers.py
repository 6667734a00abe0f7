"""Scalar logs: a JSONL file (one object per logged step), TensorBoard event files, a progress bar.

Only process 0 writes. TensorBoard events come from `tensorboardX` (small, no TensorFlow);
`config.tensorboard = False` turns them off. The progress bar is tqdm when stderr is a terminal,
else a plain log line per logged step with the ETA.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax

log = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, workdir, *, tensorboard: bool = True, total_steps: int, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total, self.start = total_steps, start_step
        self._jsonl = self._tb = self._bar = None
        self._t0 = time.time()
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict, extra: dict | None = None) -> None:
        """Scalars to JSONL and TensorBoard; `extra` (JSON-able) to the JSONL line only."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars, **(extra or {})}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def progress(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        loss = scalars.get("core_loss")
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4g}" if loss is not None else "-")
            self._bar.refresh()
            return
        done = step - self.start
        elapsed = time.time() - self._t0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        log.info("step %d/%d loss %s eta %.0fs", step, self.total, f"{loss:.4g}" if loss is not None else "-", eta)

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
