"""Is the run still training? A non-finite loss, gradient norm or weight stops it, naming the newest checkpoint
that is intact and healthy; a gradient norm stuck at zero, a loss far above its running mean, or weights
beyond float16's range are each warned about once and kept in the trainer state (so in run.json)."""

from __future__ import annotations

import logging
import math
from collections import deque

import torch

from minift.train.checkpoints import last_good_checkpoint
from minift.train.sharding import local_view

logger = logging.getLogger(__name__)
FLOAT16_MAX = 65504.0  # beyond it a weight cannot be exported at half precision: no trained model gets there
ZERO_GRAD_STEPS = 5  # consecutive optimizer steps with a zero gradient norm before saying so
RUNNING = 20  # losses in the running mean an exploding loss is measured against


class Health:
    def __init__(self, accelerator, output_dir, params: list, warnings: list[str]):
        self.accelerator, self.output_dir, self.params = accelerator, output_dir, params
        self.warnings = warnings  # the trainer state's list: checkpoints keep what was said before a resume
        self.recent: deque[float] = deque(maxlen=RUNNING)
        self.zero_since: int | None = None

    def stop(self, what: str, step: int):
        good = last_good_checkpoint(self.output_dir)
        raise FloatingPointError(f"{what} at step {step}; stopping. The last good checkpoint is "
                                 f"{good or 'none (none was saved yet)'}. Lower the learning rate or check the data.")

    def warn(self, kind: str, message: str) -> None:
        if not any(w.startswith(kind) for w in self.warnings):
            self.warnings.append(f"{kind}: {message}")
            logger.warning("%s: %s", kind, message)

    def check_loss(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            self.stop(f"loss is {loss}", step)
        if len(self.recent) >= 5:
            mean = sum(self.recent) / len(self.recent)
            if loss > mean + 3 * max(abs(mean), 1.0):
                self.warn("exploding loss", f"{loss:.4g} at step {step}, against a mean of {mean:.4g} over the "
                                            f"{len(self.recent)} steps before: the run may be diverging (lower "
                                            f"--learning_rate, or check the data)")
        self.recent.append(loss)

    def check_gradient(self, grad_norm, step: int) -> None:
        """``grad_norm``: the clipped gradients' norm before clipping (None when clipping is off)."""
        if grad_norm is None:
            return
        norm = float(grad_norm)
        if not math.isfinite(norm):
            if self.accelerator.mixed_precision != "fp16":  # fp16's loss scaler skips such a step by design
                self.stop(f"gradient norm is {norm}", step)
            return
        if norm > 0:
            self.zero_since = None
            return
        self.zero_since = self.zero_since or step
        if step - self.zero_since + 1 >= ZERO_GRAD_STEPS:
            self.warn("zero gradient", f"the gradient norm has been 0 since step {self.zero_since}: nothing is "
                                       f"learning (weights diverged or saturated by a learning rate too high, or "
                                       f"no trained tokens)")

    def check_weights(self, step: int) -> bool:
        """Stop on a non-finite trainable weight; True when every weight is within float16's range. Every process
        calls it at the same step (the largest weight is gathered)."""
        shards = [local_view(p) for p in self.params]  # a sharded model's: this process's part
        local = torch.stack([p.detach().abs().max().float() for p in shards if p.numel()] or
                            [torch.zeros((), device=self.accelerator.device)]).max()
        largest = float(self.accelerator.gather(local.reshape(1).to(self.accelerator.device)).max())
        if not math.isfinite(largest):
            self.stop("trainable weights are not finite", step)
        if largest > FLOAT16_MAX:
            self.warn("huge weights", f"trainable weights reach {largest:.3g} at step {step}, beyond float16's "
                                      f"range ({FLOAT16_MAX:g}): the run has diverged (lower --learning_rate)")
            return False
        return True
