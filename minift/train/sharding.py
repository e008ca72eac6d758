"""FSDP (PyTorch's ``fully_shard``, version 2) for CPU processes, where Accelerate does not apply it.

``accelerate launch --config_file recipes/configs/accelerate_fsdp_cpu.yaml`` tells every process
``ACCELERATE_USE_FSDP=true``. With GPUs, Accelerate shards the model in ``prepare``. On CPU processes (gloo) it
sets them up as ``MULTI_CPU`` and ignores its FSDP plugin: it would wrap the model in DDP, every process holding
every weight. So there minift shards the model itself: each transformer block (the model's ``_no_split_modules``,
or ``fsdp_transformer_layer_cls_to_wrap``) is one unit and the recipe's training wrapper is the root, holding the
rest (embeddings, final norm, LM head). Gradients are reduce-scattered as the mean over processes, as DDP's
all-reduce, so the recipes' loss scaling is unchanged.

A sharded model's forward is a collective: every process must run the same forwards. The training step's does;
anything else that runs the model or reads its weights (evaluation, generation, saving) goes inside
:func:`gathered`, which all-gathers every weight on every process for its duration (the full model's memory,
briefly), so that each process may then forward alone. Checkpoints hold the weights and the optimizer state
gathered whole (the main process holds them while saving): whole files, as an unsharded run's, and the optimizer
state keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref

import torch
from torch import nn

from minift.config import ConfigError
from minift.train.memory import return_freed_memory
from minift.train.zero import gathered as zero_gathered

logger = logging.getLogger(__name__)

_ROOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the module it was sharded under
_GATHERED: set[int] = set()  # ids of roots inside a gathered() block


def fsdp_launch() -> bool:
    """Whether the launcher asked for FSDP (``distributed_type: FSDP`` in an Accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def needs_own_sharding(accelerator) -> bool:
    """FSDP asked for, on CPU processes: Accelerate leaves it to us (see the module doc)."""
    from accelerate.utils import DistributedType

    return fsdp_launch() and accelerator.distributed_type == DistributedType.MULTI_CPU


def check_cpu_launch(cfg) -> None:
    """What an Accelerate config asks of CPU processes that minift cannot do, said before any weights load."""
    env = os.environ
    if not fsdp_launch():
        return
    if env.get("FSDP_VERSION", "2") != "2":
        raise ConfigError("FSDP on CPU processes: minift shards with FSDP version 2 (fully_shard); set "
                          "fsdp_version: 2 in the Accelerate config (recipes/configs/accelerate_fsdp_cpu.yaml)")
    if env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ConfigError("FSDP on CPU processes: fsdp_cpu_ram_efficient_loading: true has transformers make new "
                          "weights (a reward model's head) on the first process only, for a broadcast minift does "
                          "not do here; set fsdp_cpu_ram_efficient_loading: false in the Accelerate config (each "
                          "process reads the weights file, as recipes/configs/accelerate_fsdp_cpu.yaml does)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ConfigError(f"FSDP on CPU processes: fsdp_auto_wrap_policy {policy} is not supported; minift shards "
                          f"by transformer block (TRANSFORMER_BASED_WRAP)")
    if getattr(cfg, "use_4bit", False) or getattr(cfg, "use_8bit", False):
        raise ConfigError("FSDP cannot shard a bitsandbytes-quantized base on CPU processes: drop --use_4bit / "
                          "--use_8bit, or launch with DDP (recipes/configs/accelerate_ddp.yaml)")


def shard(model: nn.Module, root: nn.Module, *, mixed_precision: str) -> None:
    """``fully_shard`` every transformer block of ``model``, then ``root`` (a module holding ``model``, whose
    forward is the training step's; its parameters outside ``model`` are left alone). bf16 mixed precision: bf16
    compute, fp32 weights and gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    blocks = {c.strip() for c in named.split(",") if c.strip()} or set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    kinds = "/".join(sorted({type(u).__name__ for u in units}))
    if not units:
        raise ConfigError(f"FSDP: no module of {type(model).__name__} is a transformer block to shard by (looked "
                          f"for {sorted(blocks) or 'the model’s _no_split_modules, which it does not declare'}); "
                          f"name its block class with fsdp_transformer_layer_cls_to_wrap in the Accelerate config")
    options: dict = {"reshard_after_forward": reshard_after_forward()}
    if mixed_precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision == "fp16":
        raise ConfigError("FSDP on CPU processes: fp16 mixed precision has no gradient scaler here; use bf16 or no")
    return_freed_memory()
    for unit in units:
        fully_shard(unit, **options)
    # What the root holds beside the model (a distillation teacher's head) stays whole and outside FSDP.
    own = {id(p) for p in model.parameters()}
    fully_shard(root, ignored_params={p for p in root.parameters() if id(p) not in own}, **options)
    # FSDP takes the first module to run forward as the root; the first forward may be a rollout's through
    # ``model`` (not ``root``), which would make a block its own root. Fix the root now (no public call does).
    root._get_fsdp_state()._lazy_init()
    register(model, root)
    logger.info("FSDP: %d %s blocks and the root sharded over %d CPU processes", len(units), kinds,
                torch.distributed.get_world_size())


def register(model: nn.Module, root: nn.Module) -> None:
    """Note that ``model`` is sharded under ``root`` (by :func:`shard`, or by Accelerate's FSDP2 on GPUs), for
    :func:`gathered` and the checkpoints."""
    _ROOTS[model] = (root, reshard_after_forward())


def reshard_after_forward() -> bool:
    """The Accelerate config's ``fsdp_reshard_after_forward`` (true unless set false)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"


def is_sharded(model: nn.Module) -> bool:
    return model in _ROOTS


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every weight of a sharded ``model`` whole on this process, for the block: forwards there run without
    collectives (each process may run its own), and the parameters are plain tensors (saving reads them).
    Every process must enter it (the all-gather is a collective); nested blocks are free. Writes to the
    weights inside are lost when it ends. A model that is not sharded: nothing happens. A model under DeepSpeed
    ZeRO-3: its parameters gathered the same way (:func:`minift.train.zero.gathered`)."""
    from torch.distributed.fsdp import FSDPModule

    root, reshard = _ROOTS.get(model, (None, True))
    if root is None:
        with zero_gathered(model):  # DeepSpeed ZeRO-3 partitions parameters its own way
            yield
        return
    if id(root) in _GATHERED:
        yield
        return
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # a forward inside must not give its weights back
        unit.unshard()
    _GATHERED.add(id(root))
    try:
        yield
    finally:
        _GATHERED.discard(id(root))
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict read from the tensors it holds now: inside :func:`gathered`, the whole weights
    (``model.state_dict()`` would hand back the shards: FSDP's hook puts them back first). Tied weights once."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{prefix}.{name}" if prefix else name] = buffer
    return state


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state dict; for a sharded model gathered whole onto the main process (a collective:
    every process calls it; the others get an empty dict), keyed by parameter name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Restore what :func:`optimizer_state` saved; each process keeps its shard of it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))
