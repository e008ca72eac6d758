"""A stage's set-up: the Accelerator, the model with its adapters, the optimizer and the schedule."""

from __future__ import annotations

import gc
import logging
import math
import os
import re

import torch
from torch import nn

from minift.config import ConfigError
from minift.constants import DEFAULT_ADAPTER
from minift.lora.adapters import load_adapter
from minift.lora.config import LoraConfig
from minift.lora.layers import apply_lora, check_ranks
from minift.lora.merge import merge_lora, unwrap_lora
from minift.model.attention import use_document_attention
from minift.model.load import load_model
from minift.sections import TrainConfig
from minift.train.sharding import check_cpu_launch
from minift.train.zero import check_launch, deepspeed_launch, load_whole

logger = logging.getLogger(__name__)


def has_device() -> bool:
    """Whether this machine has a GPU (or another accelerator PyTorch drives)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def cpu_process_group() -> bool:
    """Whether to ask Accelerate for the CPU: it only sets up a CPU process group (gloo) when asked, and without
    one, processes started by torchrun / `accelerate launch` on a machine without a GPU each run alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device()


def check_cpu_machine(cfg: TrainConfig) -> None:
    """What only a GPU can run, refused on a machine without one before anything loads: fp16 (its loss scaling
    is CUDA's), and a launch of more processes than the machine has cores (a GPU config's num_processes counts
    GPUs: recipes/configs/accelerate_ddp.yaml starts 8)."""
    if cfg.mixed_precision == "fp16" or os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
        raise ConfigError("fp16 mixed precision needs a GPU (its loss scaling is CUDA's) and this machine has none; "
                          "use --mixed_precision bf16 (fast on CPUs with AVX-512 BF16 / AMX) or no")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if processes > cores:
        raise ConfigError(f"this launch starts {processes} processes on a machine with no GPU and {cores} CPU cores: "
                          f"the Accelerate config is written for GPUs (its num_processes counts GPUs). On CPUs "
                          f"launch at most {cores} processes (accelerate launch --num_processes {cores} ...), or "
                          f"with recipes/configs/accelerate_fsdp_cpu.yaml")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator with the configured (or launcher-given) mixed precision and trackers; seeds everything."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    cpu, handlers, deepspeed = cpu_process_group(), [], deepspeed_launch()
    if not has_device():
        check_cpu_machine(cfg)
    if deepspeed:
        check_launch(cfg, cpu=cpu)
        if cpu:  # Accelerate's DeepSpeed path (not its MULTI_CPU one) over gloo: DeepSpeed's CPU accelerator
            cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    elif cpu:  # before Accelerate reads the FSDP settings (it refuses some on CPU with a traceback)
        check_cpu_launch(cfg)
    accelerator = Accelerator(
        cpu=cpu,
        kwargs_handlers=handlers,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
    )
    if deepspeed:
        load_whole()
    set_seed(cfg.seed)
    bf16 = accelerator.mixed_precision == "bf16" or cfg.dtype == "bfloat16"
    if bf16 and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("bf16 on a CPU without native bf16 matrix units (AVX-512 / AMX): PyTorch falls back to a "
                       "kernel ~100x slower than fp32 here; train with --mixed_precision no --dtype float32")
    return accelerator


def cpu_has_native_bf16() -> bool:
    """Whether PyTorch has a fast bf16 matrix multiply on this CPU (oneDNN: AVX-512 or AMX; ARM bf16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def end_stage(accelerator) -> None:
    """The end of a recipe's ``main``: wait for every process and finish the trackers. Unlike
    ``accelerator.end_training()`` this keeps the process group, which a chained next stage
    (``recipes/sft_dpo.py``) still uses; :func:`close_processes` ends it when the script exits."""
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()


def close_processes(finished: bool = True) -> None:
    """Destroy the process group, if this process has one (the last line of a recipe script). After a run that
    ``finished``, once every process has got here (none is still inside a collective when a peer shuts its
    connections), and after collecting objects in reference cycles that may still hold work of the group: what
    of the group outlives the interpreter's shutdown can abort the process there (a worker thread needing the GIL;
    a CI run once ended so, "terminate called without an active exception", on one rank of two). After an error
    the peers may be elsewhere, so no barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()


def lora_config_from(cfg: TrainConfig, modules_to_save: list[str] | None = None) -> LoraConfig:
    targets = cfg.target_modules
    if targets == ["all-linear"]:
        spec: list[str] | str = "all-linear"
    elif len(targets) == 1 and re.search(r"[*+?\[\](){}|^$\\]", targets[0]):
        spec = targets[0]  # a regular expression
    else:
        spec = targets
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=spec,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, modules_to_save=modules_to_save)


def load_for_training(cfg: TrainConfig, tokenizer, task: str = "causal_lm"):
    """The base model, the frozen init adapter (if any) and the trainable adapter (or a full fine-tune).
    ``task="seq_cls"``: a one-output sequence-classification head, trained in full beside the adapter (peft's
    ``modules_to_save``), so that the adapter alone restores the reward model."""
    quantization = "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None
    model = load_model(cfg.model_name_or_path, tokenizer, dtype=cfg.dtype, quantization=quantization,
                       gradient_checkpointing=cfg.gradient_checkpointing, task=task)
    if task == "seq_cls":
        if not isinstance(getattr(model, "score", None), nn.Linear):
            raise ConfigError(f"{cfg.model_name_or_path}: {type(model).__name__} has no `score` head; reward models "
                              f"need an architecture whose sequence-classification head is named score")
    use_document_attention(model)  # sdpa -> minift_sdpa: packed documents attend without a mask
    try:  # a bad init adapter, target_modules matching no layer, a rank too big: the user's input, not a crash
        if cfg.init_adapter:
            load_adapter(model, cfg.init_adapter, adapter_name="init", trainable=False)
        if cfg.lora_r > 0:
            lora_config = lora_config_from(cfg, ["score"] if task == "seq_cls" else None)
            check_ranks(model, lora_config)
            apply_lora(model, lora_config, adapter_name=DEFAULT_ADAPTER)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.lora_r == 0:
        if cfg.init_adapter:  # a full fine-tune starts from base + init adapter, folded in exactly
            merge_lora(model)
            unwrap_lora(model)
        model.requires_grad_(True)
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW); no weight decay on biases, norms and DoRA magnitudes (1-D)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)
    import bitsandbytes as bnb

    if cfg.optim == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise ValueError("paged_adamw_8bit pages optimizer state through CUDA memory; use adamw_8bit on CPU")
        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.learning_rate)
    return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Linear warm-up from 0, then cosine or linear decay to 0, or constant: the formulas of transformers'
    schedules, written here because importing those pulls in peft and bitsandbytes when they are installed."""
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
