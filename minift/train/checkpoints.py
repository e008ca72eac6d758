"""Checkpoints: atomic save, exact resume (weights, optimizer, scheduler, every process's RNG, trainer state),
pruning that keeps the newest and the best, and the final weights (adapter or full model)."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minift.config import ConfigError
from minift.constants import DEFAULT_ADAPTER
from minift.lora.adapters import atomic_directory, load_adapter, save_adapter
from minift.lora.layers import set_trainable
from minift.model.files import set_usual_modes
from minift.model.from_gguf import file_sha256
from minift.train.sharding import (
    gathered,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    whole_state_dict,
)
from minift.train.zero import load_optimizer_state as load_zero_optimizer_state
from minift.train.zero import optimizer_state as zero_optimizer_state
from minift.train.zero import uses_deepspeed

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); nothing of it is left behind."""


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
    if uses_deepspeed(accelerator):  # every process's ZeRO partition, in a list
        optimizer_dict = zero_optimizer_state(accelerator, optimizer)
    else:  # every process: gathered whole when sharded
        optimizer_dict = optimizer_state(weights.model, optimizer)
    path = Path(output_dir) / f"checkpoint-{state['step']}"
    with gathered(weights.model):
        if accelerator.is_main_process:
            write_checkpoint(path, output_dir, weights, optimizer_dict, scheduler, rng_states, state,
                             save_total_limit=save_total_limit)
    accelerator.wait_for_everyone()
    return path


def write_checkpoint(path: Path, output_dir, weights: "Weights", optimizer_dict: dict, scheduler, rng_states: list,
                     state: dict, *, save_total_limit: int) -> None:
    """The main process's part of :func:`save_checkpoint`: the files, then the pruning."""
    try:
        with atomic_directory(path) as tmp:
            weights.save(tmp)
            torch.save(optimizer_dict, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "checkpoint": str(path)}, indent=2))
            write_manifest(tmp)
    except (OSError, RuntimeError) as err:  # a full disk: OSError, or torch.save's RuntimeError around it
        previous = last_good_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {getattr(err, 'strerror', None) or err}; "
                              f"{kept}. Free space (or pick another output_dir) and resume with "
                              f"--resume_from_checkpoint auto") from err
    prune_checkpoints(Path(output_dir), save_total_limit, keep=[path, state.get("best_checkpoint")])


class Weights:
    """What a stage trains and saves: the adapter named :data:`DEFAULT_ADAPTER` (PEFT format, in ``<dir>/adapter``)
    or, for a full fine-tune, the whole model (``<dir>/model``); and any further trainable adapters
    (``extra_adapters``, e.g. PPO's value adapter: ``<dir>/adapter_<name>``) and modules (``extra_modules``, e.g. a
    value head: ``<dir>/<name>.safetensors``) a recipe adds."""

    def __init__(self, model: nn.Module, *, full: bool, base_model: str, parents: list[str]):
        self.model, self.full, self.base_model, self.parents = model, full, base_model, parents
        self.subdir = "model" if full else "adapter"
        self.extra_adapters: list[str] = []
        self.extra_modules: dict[str, nn.Module] = {}

    def save(self, out_dir: Path) -> Path:
        """Everything trained, into ``out_dir``; returns the main part's directory."""
        if self.full:  # a sharded model's weights are read inside gathered(): its state_dict() gives shards
            whole = whole_state_dict(self.model) if is_sharded(self.model) else None
            self.model.save_pretrained(out_dir / "model", state_dict=whole)
        else:
            save_adapter(self.model, out_dir / "adapter", adapter_name=DEFAULT_ADAPTER, base_model_name_or_path=self.base_model,
                         parents=self.parents)
        for name in self.extra_adapters:
            save_adapter(self.model, out_dir / f"adapter_{name}", adapter_name=name,
                         base_model_name_or_path=self.base_model, parents=self.parents)
        for name, module in self.extra_modules.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out_dir / f"{name}.safetensors"),
                      metadata={"format": "pt"})
            set_usual_modes(out_dir / f"{name}.safetensors")
        if self.full:
            set_usual_modes(out_dir / "model")
        return out_dir / self.subdir

    def load(self, checkpoint: Path) -> None:
        if not self.full:
            load_adapter(self.model, checkpoint / "adapter", adapter_name=DEFAULT_ADAPTER, trainable=True)
            for name in self.extra_adapters:
                load_adapter(self.model, checkpoint / f"adapter_{name}", adapter_name=name, trainable=True)
            set_trainable(self.model, [DEFAULT_ADAPTER, *self.extra_adapters])  # each load made only itself trainable
            for name, module in self.extra_modules.items():
                module.load_state_dict(load_file(str(checkpoint / f"{name}.safetensors")))
                module.requires_grad_(True)
            return
        state = {}
        for file in sorted((checkpoint / "model").glob("*.safetensors")):
            state.update(load_file(str(file)))
        result = self.model.load_state_dict(state, strict=False)
        loaded = {p.data_ptr() for n, p in self.model.named_parameters() if n in state}
        missing = [k for k in result.missing_keys if self.model.get_parameter(k).data_ptr() not in loaded]  # tied
        if result.unexpected_keys or missing:
            raise ValueError(f"{checkpoint / 'model'} does not match the model: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")


CHECKPOINT = re.compile(r"checkpoint-(\d+)")
MANIFEST = "manifest.json"  # every other file of a checkpoint with its size and SHA-256


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories of output_dir, oldest first (other names are not checkpoints)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, or None when every file is as it was saved."""
    try:
        entries = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an interrupted save, or a checkpoint of a minift without checksums)"
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(entries, dict) or "trainer_state.json" not in entries:
        return f"{MANIFEST} is damaged"
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        saved = entry.get("bytes") if isinstance(entry, dict) else None
        if file.stat().st_size != saved:
            return f"{name} has {file.stat().st_size} bytes, not the {saved} saved"
        if file_sha256(file) != entry.get("sha256"):
            return f"{name} does not match its checksum (changed or corrupted after the save)"
    step = json.loads((path / "trainer_state.json").read_text()).get("step")
    if CHECKPOINT.fullmatch(path.name) and step != int(CHECKPOINT.fullmatch(path.name).group(1)):
        return f"trainer_state.json says step {step}"
    return None


def prune_checkpoints(output_dir: Path, limit: int, keep: list) -> None:
    """Delete the oldest checkpoints beyond ``limit``, never one in ``keep`` (the newest and the best)."""
    if limit <= 0:
        return
    keep = {str(Path(k).resolve()) for k in keep if k}  # resolved: a resumed run may spell output_dir differently
    found = checkpoints(output_dir)
    extra = len(found) - limit
    for path in found:
        if extra <= 0:
            break
        if str(path.resolve()) not in keep:
            shutil.rmtree(path)
            extra -= 1


def newest_intact_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their checksums, and what is wrong with each newer one."""
    damaged = []
    for path in reversed(checkpoints(output_dir)):
        damage = checkpoint_damage(path)
        if damage is None:
            return path, damaged
        damaged.append(f"{path.name}: {damage}")
    return None, damaged


def _healthy(path: Path) -> bool:
    return json.loads((path / "trainer_state.json").read_text()).get("healthy", True)


def last_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint whose weights were healthy when saved (see :mod:`minift.train.health`)."""
    return next((p for p in reversed(checkpoints(output_dir)) if checkpoint_damage(p) is None and _healthy(p)), None)


def find_checkpoint(output_dir: str, spec: str) -> Path | None:
    """``auto``: the newest intact ``checkpoint-N`` in output_dir (None if there is none; damaged newer ones are
    skipped with a warning that names the damage); else the given path, which must be intact."""
    if spec != "auto":
        path = Path(spec)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint (no trainer_state.json)")
        damage = checkpoint_damage(path)
        if damage:
            raise ConfigError(f"checkpoint {path} is damaged: {damage}; resume from another checkpoint or "
                              f"start afresh with --overwrite_output_dir true")
        return path
    path, damaged = newest_intact_checkpoint(output_dir)
    if damaged and path is None:
        raise ConfigError(f"no intact checkpoint in {output_dir} ({'; '.join(damaged)}); start afresh with "
                          f"--overwrite_output_dir true instead of --resume_from_checkpoint")
    if damaged:
        logger.warning("skipping damaged checkpoints (%s); resuming from %s", "; ".join(damaged), path)
    if path and not _healthy(path):
        logger.warning("%s was saved with diverged weights (see its run's warnings); the last good checkpoint is "
                       "%s", path, last_good_checkpoint(output_dir) or "none")
    return path


def check_same_run(path: Path, settings: dict) -> None:
    """Refuse to resume the checkpoint at ``path`` with settings (see :func:`minift.config.run_settings`) that
    differ from those it was trained with: naming each change, and how to start afresh instead."""
    saved = json.loads((path / "trainer_state.json").read_text()).get("settings")
    if saved is None:
        raise ConfigError(f"{path} records no run settings (an older minift saved it), so resuming it cannot be "
                          f"checked; start afresh with --overwrite_output_dir true or another --output_dir")
    current = json.loads(json.dumps(settings, default=str))
    unset = "(unset)"
    changed = [f"{k} {saved.get(k, unset)!r} -> {current.get(k, unset)!r}" for k in sorted(saved.keys() | current.keys())
               if saved.get(k, unset) != current.get(k, unset)]
    if changed:
        raise ConfigError(f"cannot resume {path}: {'; '.join(changed)}. These settings change what the run trains; "
                          f"resume with the checkpoint's values, or start afresh with --overwrite_output_dir true "
                          f"or another --output_dir")


def load_checkpoint(path: Path, accelerator, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore the optimizer (of ``model``'s weights, which :meth:`Weights.load` restored before any sharding),
    scheduler and this process's RNG; return the trainer state."""
    optimizer_dict = torch.load(path / "optimizer.pt", weights_only=True)
    if uses_deepspeed(accelerator):
        load_zero_optimizer_state(optimizer, optimizer_dict)
    else:
        load_optimizer_state(model, optimizer, optimizer_dict)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    _set_rng_state(rng[accelerator.process_index])
    return json.loads((path / "trainer_state.json").read_text())
