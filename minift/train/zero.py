"""DeepSpeed ZeRO through Accelerate (``accelerate launch --config_file recipes/configs/accelerate_zero2.yaml``),
with minift's own gradient accumulation.

Accelerate's DeepSpeed path fills the engine's batch sizes from the dataloaders it prepares, steps the engine in
every ``accelerator.backward`` and counts micro-batches itself. minift prepares no dataloader, and a recipe may run
any number of backward passes in one optimizer step (one per micro-batch, or two, as PPO's value adapter does). So
here the engine runs with ``managed_gradient_accumulation: false`` (0.19.8 tested): each backward only
accumulates (ZeRO-2 / 3 reduce-scatter the gradients as they come), and :func:`step`, called once per optimizer
step from :meth:`~minift.train.stage.Stage.update`, finalizes them, clips at ``--max_grad_norm`` and updates.
``train_micro_batch_size_per_gpu`` is ``--per_device_train_batch_size``; DeepSpeed's own accumulation count stays 1
(the recipes' losses are already normalized over the whole step).

Checkpoints hold each process's ZeRO optimizer partition, gathered into one ``optimizer.pt`` by the main process
(a list, one entry per process: a resume needs the same process count, which minift checks anyway).
With ZeRO-3 the parameters are partitioned too, by the engine: each process loads the model whole first
(:func:`load_whole`), and :func:`gathered` makes the weights whole on every process for a block, as FSDP's does
(see :mod:`minift.train.sharding`).
"""

from __future__ import annotations

import contextlib
import os
import weakref

from minift.config import ConfigError
from minift.train.memory import return_freed_memory

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the ZeRO-3 engine training it
_GATHERED: set[int] = set()  # ids of engines inside a gathered() block


def deepspeed_launch() -> bool:
    """Whether the launcher asked for DeepSpeed (``distributed_type: DEEPSPEED`` in an Accelerate config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_launch(cfg, *, cpu: bool) -> None:
    """What minift cannot run under DeepSpeed, said before any weights load (``cpu``: CPU processes)."""
    env = os.environ
    try:
        import deepspeed
        from deepspeed.runtime import constants
    except ImportError as err:
        raise ConfigError(f"the Accelerate config asks for DeepSpeed, which does not import here ({err}); "
                          f"pip install 'minift[deepspeed]', or launch with FSDP or DDP") from err
    if not hasattr(constants, "MANAGED_GRADIENT_ACCUMULATION"):
        raise ConfigError(f"DeepSpeed {deepspeed.__version__} cannot leave gradient accumulation to minift (no "
                          f"managed_gradient_accumulation option); pip install -U deepspeed (0.19.8 is tested)")
    if getattr(cfg, "use_4bit", False) or getattr(cfg, "use_8bit", False):
        raise ConfigError("DeepSpeed cannot train a bitsandbytes-quantized base: drop --use_4bit / --use_8bit, or "
                          "launch with DDP (recipes/configs/accelerate_ddp.yaml)")
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if steps not in ("1", "auto", str(cfg.gradient_accumulation_steps)):
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps {steps}; minift accumulates "
                          f"itself: set it to 1 in the Accelerate config and pass --gradient_accumulation_steps "
                          f"{steps} to the recipe")
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping not in (None, "auto", "none") and float(clipping) != cfg.max_grad_norm:
        raise ConfigError(f"the DeepSpeed config clips gradients at {clipping}, the recipe at --max_grad_norm "
                          f"{cfg.max_grad_norm}; make them agree (or drop gradient_clipping from the Accelerate "
                          f"config: --max_grad_norm decides)")
    if getattr(cfg, "value_model", None) == "adapter" and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError("PPO's value adapter does not train correctly under ZeRO-3: its second backward pass of "
                          "each micro-batch is the first to reach the value adapter, and ZeRO-3 adds a later pass's "
                          "gradients onto the buffer its first pass would have reset, so the previous step's "
                          "gradients stay in (measured: the second step's gradient norm 2% off); use ZeRO-2 or "
                          "FSDP, or --value_model shared")
    if cpu:
        for what in ("OPTIMIZER", "PARAM"):
            device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none")
            if device != "none":
                raise ConfigError(f"DeepSpeed on CPU processes: offload_{what.lower()}_device {device} offloads "
                                  f"from a GPU; the weights are already in CPU memory here: set it to none")


def prepare_engine(accelerator, cfg, model, wrapper, optimizer):
    """``accelerator.prepare(wrapper, optimizer)`` into a DeepSpeed engine that takes the recipe's batch size and
    clipping and leaves accumulation to minift (see the module doc); ``accelerator.backward`` then only
    accumulates, and :func:`step` steps. Returns the engine and its optimizer."""
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    config["train_batch_size"] = cfg.per_device_train_batch_size * accelerator.num_processes
    config["gradient_accumulation_steps"] = 1
    config["managed_gradient_accumulation"] = False
    config["gradient_clipping"] = cfg.max_grad_norm
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero["overlap_comm"] = False  # DeepSpeed allows overlap only at ZeRO-2 when it does not manage accumulation
    return_freed_memory()  # gathered weights come and go here too
    engine, optimizer = accelerator.prepare(wrapper, optimizer)

    class Accumulate(DeepSpeedEngineWrapper):
        def backward(self, loss, sync_gradients=True, **kwargs):
            self.engine.backward(loss, **kwargs)

    accelerator.deepspeed_engine_wrapped = Accumulate(engine)
    if engine.zero_optimization_stage() == 3:
        _ENGINES[model] = engine
        # ZeRO-3 gathers a module's weights as its forward starts; the LM head's (and a teacher head's, held beside
        # the model) are read as tensors by the losses (minift.losses.lm_head) in the forwards of the wrapper's own
        # modules (a loss, a log-prob module), so each of those gathers them.
        import deepspeed

        inside = {id(m) for m in model.modules()}
        own = {id(p) for p in model.parameters()}
        read = [*model.get_output_embeddings().parameters(), *(p for p in wrapper.parameters() if id(p) not in own)]
        for module in (m for m in wrapper.modules() if id(m) not in inside):
            for param in read:
                deepspeed.zero.register_external_parameter(module, param)
    return engine, optimizer


def step(accelerator) -> float | None:
    """The optimizer step of everything accumulated since the last one: reduce, clip, update, zero. Returns the
    gradient norm before clipping (None if the engine did not measure it)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.step()
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def uses_deepspeed(accelerator) -> bool:
    """Whether ``accelerator`` runs a DeepSpeed engine."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def optimizer_state(accelerator, optimizer) -> list | None:
    """Every process's ZeRO partition of the optimizer state, gathered onto the main process (a collective; the
    others get None), in what ``torch.load(weights_only=True)`` reads back: enums as ints, and the loss scaler
    object left out (minift's DeepSpeed runs do not scale losses)."""
    from accelerate.utils import gather_object

    plain = {k: _plain(v) for k, v in getattr(optimizer, "optimizer", optimizer).state_dict().items()}
    states = gather_object([{k: v for k, v in plain.items() if v is not _OBJECT}])
    return states if accelerator.is_main_process else None


_OBJECT = object()


def _plain(value):
    """``value`` in plain types (an int enum as its int), or ``_OBJECT`` when it holds anything else."""
    import enum

    import torch

    if isinstance(value, (dict, list, tuple)):
        items = {k: _plain(v) for k, v in (value.items() if isinstance(value, dict) else enumerate(value))}
        if any(v is _OBJECT for v in items.values()):
            return _OBJECT
        return items if isinstance(value, dict) else type(value)(items.values())
    if isinstance(value, enum.Enum):
        return value.value
    plain = value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size))
    return value if plain else _OBJECT


def load_optimizer_state(optimizer, states: list) -> None:
    """Restore :func:`optimizer_state`'s list: each process takes its own partition (fp32 masters included); what
    the save left out (the loss scaler) stays as the optimizer has it now."""
    zero = getattr(optimizer, "optimizer", optimizer)
    current = zero.state_dict()
    zero.load_state_dict([{**current, **state} for state in states], load_from_fp32_weights=True)


def load_whole() -> None:
    """Have transformers load every model whole in each process. Accelerate marks a ZeRO-3 run for transformers,
    which then partitions each model as it loads (``zero3_init_flag``), and its ``generate`` waits on the other
    processes. minift changes a base model before training (adapters, an init adapter merged in, a resumed
    checkpoint) and samples on one process, so ZeRO-3 partitions the model in ``accelerator.prepare`` instead."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextlib.contextmanager
def gathered(model):
    """ZeRO-3: every parameter of ``model`` whole on this process for the block, and the engine's hooks off, so
    that forwards there need no other process (every process must enter it; nested blocks are free). Writes to
    the weights inside are lost. Any other model: nothing happens."""
    engine = _ENGINES.get(model)
    if engine is None or id(engine) in _GATHERED:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    _GATHERED.add(id(engine))
    try:  # DeepSpeed's own gather with the modules' hooks off; and the root's step hook off, a collective too
        with unwrap_model_for_generation(engine), _step_hook_off(engine.optimizer.parameter_offload):
            yield
    finally:
        _GATHERED.discard(id(engine))


@contextlib.contextmanager
def _step_hook_off(offload):
    """ZeRO-3's hook before each forward of the trained module: it checks with every process that they traced the
    same forwards (a collective), which forwards inside :func:`gathered` do not. Put back first in line after."""
    hooks, handle = offload.module._forward_pre_hooks, offload.fwd_pre_hook
    hook = hooks.pop(handle.id)
    try:
        yield
    finally:
        hooks[handle.id] = hook
        hooks.move_to_end(handle.id, last=False)
