"""Step data: fixed datasets in deterministic sharded micro-batches, and data made during training."""

from __future__ import annotations

import math

import torch

from minift.config import ConfigError
from minift.sections import TrainConfig


class ShardedBatches:
    """Deterministic micro-batches: epoch e shuffles the rows with ``seed + e``; global micro-batch j of
    the epoch is rows ``perm[j*G:(j+1)*G]`` (G = per-device batch x processes); each process takes its
    slice. A step covers micro-batches ``[step*accum, (step+1)*accum)``, so resuming at a step is exact
    and N processes with batch b see the same data as one process with batch N*b."""

    def __init__(self, rows: list, per_device: int, num_processes: int, rank: int, seed: int, collate):
        self.rows, self.per_device, self.rank, self.seed, self.collate = rows, per_device, rank, seed, collate
        self.global_batch = per_device * num_processes
        self.per_epoch = len(rows) // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"only {len(rows)} training rows, fewer than one global batch ({self.global_batch}); "
                             f"lower per_device_train_batch_size or add data")
        self._perm_epoch, self._perm = -1, None

    def micro_batch(self, index: int) -> dict:
        epoch, j = divmod(index, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=g).tolist(), epoch
        start = j * self.global_batch + self.rank * self.per_device
        return self.collate([self.rows[i] for i in self._perm[start: start + self.per_device]])


class OnlineBatches:
    """Training data made during training, e.g. rollouts: each micro-batch's prompts are drawn as
    :class:`ShardedBatches` draws rows, and ``make_batch(prompts, seeds, refill)`` turns them into a model batch.
    ``seeds[k]`` depends only on the seed and prompt k's global position in the run, so a sampler seeded
    with it gives the same batch for any number of processes and after a resume. ``refill(attempt)`` gives
    further ``(prompts, seeds)`` for a batch that wants more (dynamic sampling): the prompts of the
    ``attempt``-th following micro-batch, which still come in their own turn, then with other seeds.

    ``repeats`` > 1 (GRPO's ``num_iterations``): each window of ``accumulation`` micro-batches is made once and
    serves ``repeats`` optimizer steps in a row, so an epoch has ``repeats`` times as many steps. A resume
    restarts at a step where a window is made (the recipe checkpoints only there), so it is exact.

    ``follow(window, repeats, upcoming)``, when given, is told which rollout window each micro-batch belongs to
    before it is made, with ``upcoming()``: the same micro-batch of the next window (None after the run's last,
    ``total_steps``), which an asynchronous sampler starts on early (:meth:`Rollouts.at`)."""

    def __init__(self, prompts: list, per_device: int, num_processes: int, rank: int, seed: int, make_batch, *,
                 accumulation: int = 1, repeats: int = 1, follow=None):
        self.prompts = ShardedBatches(prompts, per_device, num_processes, rank, seed, collate=list)
        self.per_epoch, self.seed, self.make_batch = self.prompts.per_epoch * repeats, seed, make_batch
        self.accumulation, self.repeats, self._made, self.follow = accumulation, repeats, {}, follow
        self.total_steps: int | None = None  # set by the stage once the run's length is known

    def draw(self, index: int, attempt: int = 0) -> tuple[list, list[int]]:
        """Micro-batch ``index + attempt``'s prompts and their seeds (salted by ``attempt``)."""
        index += attempt
        prompts = self.prompts.micro_batch(index)
        first = index * self.prompts.global_batch + self.prompts.rank * self.prompts.per_device
        return prompts, [(self.seed * 1_000_003 + first + k + attempt * 2**48) % 2**62 for k in range(len(prompts))]

    def micro_batch(self, index: int) -> dict:
        window, offset = divmod(index, self.accumulation)
        source = window // self.repeats * self.accumulation + offset  # the micro-batch whose prompts serve here
        if source in self._made:
            return self._made[source]
        if self.follow is not None:
            rollout_window, ahead = window // self.repeats, source + self.accumulation
            last = self.total_steps is not None and (rollout_window + 1) * self.repeats >= self.total_steps
            self.follow(rollout_window, self.repeats, None if last else lambda: self.draw(ahead))
        batch = self.make_batch(*self.draw(source), lambda attempt: self.draw(source, attempt))
        if self.repeats > 1:  # kept for the window's later steps; earlier windows' batches are dropped
            self._made = {k: v for k, v in self._made.items() if k // self.accumulation == window // self.repeats}
            self._made[source] = batch
        return batch


def check_enough_rows(n_rows: int, cfg: TrainConfig, num_processes: int, what: str, per_device: int | None = None) -> None:
    """Fail before the model loads when the training data cannot fill one global batch (``per_device`` rows per
    process, by default ``per_device_train_batch_size``)."""
    fix = (f"lower --per_device_train_batch_size to {max(1, n_rows // num_processes)} or less" if per_device is None
           else "use a smaller batch")
    per_device = per_device or cfg.per_device_train_batch_size
    if n_rows < per_device * num_processes:
        procs = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ConfigError(f"{cfg.dataset_name_or_path}: the training data makes {n_rows} {what}, fewer than one "
                          f"batch ({per_device}{procs}); {fix}, or add data")


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else the epochs' micro-batches over the accumulation."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))
