"""Checkpoints: atomic save, exact resume (weights, optimizer, scheduler, every process's RNG, trainer state),
pruning that keeps the newest and the best, and the final weights (adapter or full model)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minift.constants import DEFAULT_ADAPTER
from minift.lora.adapters import atomic_directory, load_adapter, save_adapter


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, output_dir: str | Path, weights: "Weights", optimizer, scheduler, state: dict, *,
                    save_total_limit: int = 0) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically: weights, optimizer, scheduler, RNG of every process,
    and the trainer state (step, metrics, best checkpoint); then prune to ``save_total_limit``. Returns its path."""
    from accelerate.utils import gather_object

    rng_states = gather_object([_rng_state()])
    path = Path(output_dir) / f"checkpoint-{state['step']}"
    if accelerator.is_main_process:
        with atomic_directory(path) as tmp:
            weights.save(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "checkpoint": str(path)}, indent=2))
        prune_checkpoints(Path(output_dir), save_total_limit, keep=[path, state.get("best_checkpoint")])
    accelerator.wait_for_everyone()
    return path


class Weights:
    """What a stage trains and saves: the adapter named :data:`DEFAULT_ADAPTER` (PEFT format, in ``<dir>/adapter``)
    or, for a full fine-tune, the whole model (``<dir>/model``)."""

    def __init__(self, model: nn.Module, *, full: bool, base_model: str, parents: list[str]):
        self.model, self.full, self.base_model, self.parents = model, full, base_model, parents
        self.subdir = "model" if full else "adapter"

    def save(self, out_dir: Path) -> Path:
        if self.full:
            self.model.save_pretrained(out_dir / "model")
        else:
            save_adapter(self.model, out_dir / "adapter", adapter_name=DEFAULT_ADAPTER, base_model_name_or_path=self.base_model,
                         parents=self.parents)
        return out_dir / self.subdir

    def load(self, checkpoint: Path) -> None:
        if not self.full:
            load_adapter(self.model, checkpoint / "adapter", adapter_name=DEFAULT_ADAPTER, trainable=True)
            return
        from safetensors.torch import load_file

        state = {}
        for file in sorted((checkpoint / "model").glob("*.safetensors")):
            state.update(load_file(str(file)))
        result = self.model.load_state_dict(state, strict=False)
        loaded = {p.data_ptr() for n, p in self.model.named_parameters() if n in state}
        missing = [k for k in result.missing_keys if self.model.get_parameter(k).data_ptr() not in loaded]  # tied
        if result.unexpected_keys or missing:
            raise ValueError(f"{checkpoint / 'model'} does not match the model: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")


def prune_checkpoints(output_dir: Path, limit: int, keep: list) -> None:
    """Delete the oldest checkpoints beyond ``limit``, never one in ``keep`` (the newest and the best)."""
    if limit <= 0:
        return
    keep = {str(Path(k).resolve()) for k in keep if k}  # resolved: a resumed run may spell output_dir differently
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    extra = len(found) - limit
    for path in found:
        if extra <= 0:
            break
        if str(path.resolve()) not in keep:
            shutil.rmtree(path)
            extra -= 1


def find_checkpoint(output_dir: str, spec: str) -> Path | None:
    """``auto``: the newest ``checkpoint-N`` in output_dir (None if there is none); else the given path."""
    if spec != "auto":
        path = Path(spec)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint (no trainer_state.json)")
        return path
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def load_checkpoint(path: Path, accelerator, weights: Weights, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    weights.load(path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    _set_rng_state(rng[accelerator.process_index])
    return json.loads((path / "trainer_state.json").read_text())
