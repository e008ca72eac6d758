"""The pieces every recipe's loop uses; the loop itself is written out in each recipe.

Accelerator set-up, the model with its adapters, optimizer and schedule, deterministic sharded
batches, a loss wrapper that DDP can see, evaluation, and metrics logging (checkpoints: minift/checkpoints.py).
Everything here works the same with one process or many (``accelerate launch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minift.adapters import load_adapter
from minift.attention import flat_forward, use_document_attention
from minift.checkpoints import ADAPTER
from minift.config import ConfigError, TrainConfig, config_to_dict
from minift.lora import LoraConfig, ModulesToSave, apply_lora, merge_lora, unwrap_lora
from minift.losses import chunked_cross_entropy
from minift.models import load_model

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- set-up


def make_accelerator(cfg: TrainConfig):
    """An Accelerator with the configured (or launcher-given) mixed precision and trackers; seeds everything."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Accelerate only sets up a CPU process group (gloo) when asked for the CPU; without this, processes
    # started by torchrun / `accelerate launch` on a machine without a GPU each train alone on all the data.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=launched and not has_device,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
    )
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


def close_processes() -> None:
    """Destroy the process group, if this process has one (the last line of a recipe script)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def lora_config_from(cfg: TrainConfig) -> LoraConfig:
    targets = cfg.target_modules
    if targets == ["all-linear"]:
        spec: list[str] | str = "all-linear"
    elif len(targets) == 1 and re.search(r"[*+?\[\](){}|^$\\]", targets[0]):
        spec = targets[0]  # a regular expression
    else:
        spec = targets
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=spec,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)


def load_for_training(cfg: TrainConfig, tokenizer):
    """The base model, the frozen init adapter (if any) and the trainable adapter (or a full fine-tune)."""
    quantization = "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None
    model = load_model(cfg.model_name_or_path, tokenizer, dtype=cfg.dtype, quantization=quantization,
                       gradient_checkpointing=cfg.gradient_checkpointing)
    use_document_attention(model)  # sdpa -> minift_sdpa: packed documents attend without a mask
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter, adapter_name="init", trainable=False)
    if cfg.lora_r > 0:
        try:
            apply_lora(model, lora_config_from(cfg), adapter_name=ADAPTER)
        except ValueError as err:  # e.g. target_modules matching no layer: the user's config, not a crash
            raise ConfigError(str(err)) from err
    else:
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


# ----------------------------------------------------------------------------- data order


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
    :class:`ShardedBatches` draws rows, and ``make_batch(prompts, seeds)`` turns them into a model batch.
    ``seeds[k]`` depends only on the seed and prompt k's global position in the run, so a sampler seeded
    with it gives the same batch for any number of processes and after a resume."""

    def __init__(self, prompts: list, per_device: int, num_processes: int, rank: int, seed: int, make_batch):
        self.prompts = ShardedBatches(prompts, per_device, num_processes, rank, seed, collate=list)
        self.per_epoch, self.seed, self.make_batch = self.prompts.per_epoch, seed, make_batch

    def micro_batch(self, index: int) -> dict:
        prompts = self.prompts.micro_batch(index)
        first = index * self.prompts.global_batch + self.prompts.rank * self.prompts.per_device
        seeds = [(self.seed * 1_000_003 + first + k) % 2**62 for k in range(len(prompts))]
        return self.make_batch(prompts, seeds)


def check_enough_rows(n_rows: int, cfg: TrainConfig, num_processes: int, what: str) -> None:
    """Fail before the model loads when the training data cannot fill one global batch."""
    need = cfg.per_device_train_batch_size * num_processes
    if n_rows < need:
        procs = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ConfigError(f"{cfg.dataset_name_or_path}: the training data makes {n_rows} {what}, fewer than one "
                          f"batch ({cfg.per_device_train_batch_size}{procs}); lower --per_device_train_batch_size to "
                          f"{max(1, n_rows // num_processes)} or less, or add data")


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps``, else the epochs' micro-batches over the accumulation."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))


def trained_tokens(batch: dict) -> torch.Tensor:
    """Tokens that are prediction targets (labels shifted by one, as the model uses them)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


# ----------------------------------------------------------------------------- loss


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that one forward (the one DDP watches) returns the summed cross-entropy
    over trained tokens and their count. Only positions with a label reach the LM head, in chunks,
    so ``[batch, seq, vocab]`` logits never exist."""

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def _hidden_and_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        documents = {}
        if "cu_seq_lens_q" in batch:  # a flat packed batch (collate_flat): attention within each document
            bounds = batch["cu_seq_lens_q"]
            longest = int((bounds[1:] - bounds[:-1]).max())
            documents = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": batch["cu_seq_lens_k"], "max_length_q": longest,
                         "max_length_k": longest}
        with flat_forward() if documents else contextlib.nullcontext():
            out = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                        position_ids=batch.get("position_ids"), use_cache=False, **documents)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        return out.last_hidden_state[:, :-1][mask], targets[mask]

    def _logit_options(self) -> dict:
        cfg = self.model.config
        return {"softcap": getattr(cfg, "final_logit_softcapping", None), "scale": getattr(cfg, "logit_scale", None)}

    def forward(self, **batch) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, targets = self._hidden_and_targets(batch)
        head = self.model.get_output_embeddings()
        if isinstance(head, ModulesToSave):
            head = head.current()
        if type(head) is nn.Linear:
            loss = chunked_cross_entropy(hidden, head.weight, targets, chunk_size=self.chunk_size, bias=head.bias,
                                         **self._logit_options())
        else:  # a LoRA-wrapped or quantized head: recompute each chunk's logits in backward instead
            loss = hidden.new_zeros((), dtype=torch.float32)
            for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size)):
                loss = loss + checkpoint(self._chunk_loss, head, h, t, use_reentrant=False)
        return loss, targets.numel()

    def _chunk_loss(self, head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(head, h), t, reduction="sum")

    def _logits(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        opts = self._logit_options()
        if opts["scale"]:
            logits = logits * opts["scale"]
        if opts["softcap"]:
            logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
        return logits

    @torch.no_grad()
    def eval_sums(self, batch: dict) -> torch.Tensor:
        """``[summed cross-entropy, correct argmax predictions, trained tokens]`` for one batch."""
        hidden, targets = self._hidden_and_targets(batch)
        head = self.model.get_output_embeddings()
        sums = torch.zeros(3, dtype=torch.float64)
        for h, t in zip(hidden.split(self.chunk_size), targets.split(self.chunk_size)):
            logits = self._logits(head, h)
            sums[0] += F.cross_entropy(logits, t, reduction="sum").item()
            sums[1] += (logits.argmax(-1) == t).sum().item()
        sums[2] = targets.numel()
        return sums


def evaluate(accelerator, loss_model: CausalLMLoss, batches: list[dict]) -> dict[str, float]:
    """Loss, perplexity and token accuracy over this process's eval batches, summed over processes."""
    was_training = loss_model.training
    loss_model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with accelerator.autocast():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sums += accelerator.unwrap_model(loss_model).eval_sums(batch)  # DDP does not expose eval_sums
    loss_model.train(was_training)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    loss = (sums[0] / sums[2]).item() if sums[2] else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_token_acc": (sums[1] / sums[2]).item()}


# ----------------------------------------------------------------------------- logging and results


class MetricsLog:
    """Appends metrics to ``output_dir/metrics.jsonl`` and any Accelerate tracker (main process only)."""

    def __init__(self, accelerator, output_dir: str, resume_step: int = 0):
        self.accelerator, self.path = accelerator, Path(output_dir) / "metrics.jsonl"
        self.history: list[dict] = []
        if accelerator.is_main_process and self.path.exists():  # keep what a resumed run already logged
            lines = self.path.read_text().splitlines()
            self.history = [r for r in map(json.loads, lines) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        self.history.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)


_PLOT_SKIPPED = []


def plot_losses(history: list[dict], path: Path) -> Path | None:
    """A loss-curve PNG when matplotlib is installed (``pip install 'minift[plot]'``); else None, said once."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_SKIPPED:
            logger.info("loss plot skipped: matplotlib is not installed (pip install 'minift[plot]')")
            _PLOT_SKIPPED.append(True)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_json(cfg: TrainConfig, output_dir: str, **fields) -> Path:
    """``run.json``: the config, output paths, final metrics and timings; what callers and pipelines read back."""
    path = Path(output_dir) / "run.json"
    path.write_text(json.dumps({"config": config_to_dict(cfg), **fields}, indent=2, default=str) + "\n")
    return path


def push_to_hub(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Upload ``folder`` to ``repo_id`` as one commit (token from HF_TOKEN or the login cache; never logged)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return f"https://huggingface.co/{repo_id}"


def write_model_card(folder: Path, cfg: TrainConfig, stage: str, metrics: dict) -> Path:
    """``folder/README.md``: hub metadata (base model, library, tags), the training config and final metrics."""
    full = (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()
    tags = ["minift", stage] + ([] if full else ["lora"])
    lines = ["---", f"base_model: {cfg.model_name_or_path}", f"library_name: {'transformers' if full else 'peft'}",
             "tags:", *[f"- {t}" for t in tags], "---", "", f"# {folder.parent.name or folder.name}: {stage}", "",
             f"Trained with minift's `{stage}` recipe from `{cfg.model_name_or_path}`"
             + (f" after `{cfg.init_adapter}`." if cfg.init_adapter else "."), "", "## Final metrics", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines += ["", "## Training config", "", "```json", json.dumps(config_to_dict(cfg), indent=2, default=str), "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate
