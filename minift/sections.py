"""The config sections recipes compose: model, LoRA, optimization, eval, checkpoints, output (``TrainConfig``, every
training recipe), data (``DataSection``) and rollouts (``RolloutSection``, the online recipes). Each section declares
its options once, with their help and their checks (``check``); ``TrainConfig.__post_init__`` runs every section's
check, then the recipe's own."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import typing
from pathlib import Path

from minift.config import check_paths, field_default, opt, require

# report_to value -> (modules any of which its tracker imports, the package to install)
TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
                    "mlflow": (("mlflow",), "mlflow")}


def require_package(modules: tuple[str, ...], what: str, package: str) -> None:
    """Fail at config time (a --dry_run included), not hours into a run, when an optional package is missing."""
    if not any(importlib.util.find_spec(m) for m in modules):
        raise ValueError(f"{what} needs the {package} package, which is not installed: pip install {package}")


@dataclasses.dataclass
class ModelSection:
    model_name_or_path: str = opt("tiny", "base model: directory, .gguf file, hub id, 'tiny' or 'smollm2'")
    dtype: str = opt("float32", "weights dtype: float32, bfloat16, float16")
    use_4bit: bool = opt(False, "QLoRA: NF4 base (bitsandbytes)")
    use_8bit: bool = opt(False, "8-bit base (bitsandbytes)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    init_adapter: str | None = opt(None, "start from this earlier adapter (frozen)")

    def check(self) -> None:
        require([(not (self.use_4bit and self.use_8bit), "use_4bit and use_8bit are exclusive")])
        if self.use_4bit or self.use_8bit:
            require_package(("bitsandbytes",), f"use_{'4' if self.use_4bit else '8'}bit", "bitsandbytes")
        if self.init_adapter and not Path(self.init_adapter).is_dir():
            raise FileNotFoundError(f"init_adapter {self.init_adapter} does not exist")


@dataclasses.dataclass
class LoraSection:
    lora_r: int = opt(16, "LoRA rank; 0 = full fine-tune")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(["all-linear"], "module names, comma-separated, or all-linear")
    use_rslora: bool = opt(False, "scale alpha / sqrt(r)")
    use_dora: bool = opt(False, "weight-decomposed LoRA")

    def check(self) -> None:
        require([
            (self.lora_r >= 0, f"lora_r must be >= 0 (0 = full fine-tune), got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (not ((getattr(self, "use_4bit", False) or getattr(self, "use_8bit", False)) and self.lora_r == 0),
             "a 4/8-bit base cannot be fully fine-tuned: set lora_r > 0"),
        ])


@dataclasses.dataclass
class OptimSection:
    num_train_epochs: float = opt(3.0, "passes over the data (ignored if max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps; 0 = from num_train_epochs")
    per_device_train_batch_size: int = opt(8, "rows per process per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    learning_rate: float = opt(3e-3, "peak learning rate")
    lr_scheduler_type: str = opt("cosine", "cosine, linear or constant")
    warmup_ratio: float = opt(0.0, "warm-up share of the steps")
    warmup_steps: int = opt(0, "warm-up steps (overrides warmup_ratio)")
    weight_decay: float = opt(0.0, "AdamW weight decay (not on biases/norms)")
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 = off")
    optim: str = opt("adamw", "adamw, adamw_8bit or paged_adamw_8bit")
    seed: int = opt(42, "seed for data order, init and dropout")
    mixed_precision: str | None = opt(None, "no, bf16 or fp16; default: what `accelerate launch` says, else no")

    def check(self) -> None:
        require([
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "set num_train_epochs > 0 or max_steps > 0"),
            (math.isfinite(self.num_train_epochs) and math.isfinite(self.learning_rate),
             f"num_train_epochs and learning_rate must be finite, got {self.num_train_epochs}, {self.learning_rate}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.lr_scheduler_type in ("cosine", "linear", "constant"),
             f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
             "warmup_steps, weight_decay and max_grad_norm must be >= 0"),
            (self.optim in ("adamw", "adamw_8bit", "paged_adamw_8bit"),
             f"optim must be adamw, adamw_8bit or paged_adamw_8bit, got {self.optim!r}"),
            (self.mixed_precision in (None, "no", "bf16", "fp16"),
             f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"),
        ])


@dataclasses.dataclass
class EvalSection:
    validation_split: float = opt(0.05, "share of the data held out for eval")
    per_device_eval_batch_size: int = opt(16, "rows per process in evaluation", resumable=True)
    eval_steps: int = opt(0, "evaluate every N steps; 0 = at the end only", resumable=True)
    early_stopping_patience: int = opt(0, "stop after N evals without improvement")

    def check(self) -> None:
        require([
            (0 <= self.validation_split < 1, f"validation_split must be in [0, 1), got {self.validation_split}"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (self.eval_steps >= 0 and self.early_stopping_patience >= 0,
             "eval_steps and early_stopping_patience must be >= 0"),
        ])


@dataclasses.dataclass
class CheckpointSection:
    output_dir: str = opt("out/run", "where checkpoints, adapter and logs go", resumable=True)
    overwrite_output_dir: bool = opt(False, "start afresh in an output_dir that holds an earlier run "
                                             "(its checkpoints and logs are deleted)", resumable=True)
    save_steps: int = opt(0, "checkpoint every N steps; 0 = only at the end", resumable=True)
    save_total_limit: int = opt(0, "keep at most N checkpoints (best and newest kept)", resumable=True)
    resume_from_checkpoint: str | None = opt(None, "a checkpoint dir or 'auto'", resumable=True)

    def check(self) -> None:
        out = Path(self.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir {out} is a file, not a directory")
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ValueError(f"output_dir {out}: {existing} is not writable")
        require([(self.save_steps >= 0 and self.save_total_limit >= 0, "save_steps and save_total_limit must be >= 0"),
                  (not (self.overwrite_output_dir and self.resume_from_checkpoint),
                   "overwrite_output_dir and resume_from_checkpoint are exclusive: resume, or start afresh")])


@dataclasses.dataclass
class OutputSection:
    logging_steps: int = opt(10, "log metrics every N steps", resumable=True)
    report_to: str = opt("none", "none, tensorboard, wandb or mlflow", resumable=True)
    merge_output: bool = opt(False, "also write a merged full model", resumable=True)
    push_to_hub: bool = opt(False, "upload the result (token: HF_TOKEN)", resumable=True)
    hub_repo_id: str | None = opt(None, "hub repository, e.g. me/my-adapter", resumable=True)
    hub_private: bool = opt(True, "create the hub repository as private", resumable=True)
    push_adapter_only: bool = opt(True, "push the adapter, not the merged model", resumable=True)
    hub_commit_message: str = opt("Upload from minift", "the hub commit's message", resumable=True)

    def check(self) -> None:
        require([
            (self.logging_steps >= 0, "logging_steps must be >= 0"),
            (self.report_to in ("none", "tensorboard", "wandb", "mlflow"),
             f"report_to must be none, tensorboard, wandb or mlflow, got {self.report_to!r}"),
            (not self.push_to_hub or bool(self.hub_repo_id), "push_to_hub needs hub_repo_id"),
        ])
        if self.report_to in TRACKER_PACKAGES:
            modules, package = TRACKER_PACKAGES[self.report_to]
            require_package(modules, f"report_to {self.report_to}", package)


@dataclasses.dataclass
class TrainConfig(OutputSection, CheckpointSection, EvalSection, OptimSection, LoraSection, ModelSection):
    """The sections every training recipe shares. The fields' defaults run the bundled demo on the tiny model on CPU:
    a 2-layer random model that needs a high learning rate and many epochs. With any other base model, flags, YAML
    files and pipeline stages start from ``REAL_MODEL`` instead (a recipe changes or adds entries): the usual LoRA
    settings for a pretrained model. What is given explicitly always wins. (A config built in Python,
    ``SFTConfig(...)``, takes the fields' defaults as written.)"""

    REAL_MODEL: typing.ClassVar[dict] = {"learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32.0,
                                         "num_train_epochs": 3.0, "per_device_train_batch_size": 8,
                                         "warmup_ratio": 0.03, "max_seq_length": 1024, "max_new_tokens": 256}

    @classmethod
    def defaults_for(cls, model_name_or_path: str) -> dict:
        """The defaults that replace the demo's for ``model_name_or_path``: none for ``tiny``, else ``REAL_MODEL``."""
        if model_name_or_path == "tiny":
            return {}
        fields = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in cls.REAL_MODEL.items() if k in fields}

    def real_model_note(self) -> str | None:
        """A line saying which settings are the real-model defaults rather than the demo's (None: all the demo's)."""
        changed = [f"{k} {v} (demo: {field_default(f)})" for f in dataclasses.fields(self)
                   if (k := f.name) in self.REAL_MODEL and (v := getattr(self, k)) == self.REAL_MODEL[k]
                   and v != field_default(f)]
        return f"settings for a real model (not the tiny demo's): {', '.join(changed)}" if changed else None

    def batch_plan(self) -> tuple[int, int]:
        """``(rows per process per micro-batch, optimizer steps per window)``: how :class:`~minift.train.stage.Stage`
        batches the data; online recipes whose rows are prompts (or whose windows serve several updates) override it."""
        return self.per_device_train_batch_size, 1

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):  # sections first, then the recipe's own check
            if "check" in vars(klass):
                vars(klass)["check"](self)


@dataclasses.dataclass
class RolloutSection:
    """How an online recipe samples and scores completions (GRPO, PPO)."""

    max_completion_length: int = opt(16, "new tokens per completion at most")
    temperature: float = opt(1.0, "sampling temperature of the rollouts")
    top_p: float = opt(1.0, "rollout nucleus sampling (1: off)")
    top_k: int = opt(0, "rollout top-k (0: off)")
    min_p: float = opt(0.0, "rollout min-p (0: off)")
    reward: list[str] = opt(["exact_match"], "rewards: exact_match, partial_credit, think_format, length_penalty, "
                                              "module:function, file.py:function or a reward-model directory; "
                                              "comma-separated for several")
    reward_weights: list[float] | None = opt(None, "one weight per reward, comma-separated (none given: 1 each)")
    rollout_backend: str = opt("local", "who samples the rollouts: local, the policy itself; or server, an "
                                        "OpenAI-compatible server with runtime LoRA loading: tools/serve.py, vLLM")
    rollout_url: str | None = opt(None, "server backend: the server's API root, e.g. http://127.0.0.1:8000/v1",
                                  resumable=True)
    rollout_model: str | None = opt(None, "server backend: the base model's name on the server, as it "
                                          "serves it; the server must serve the same base model")
    rollout_sync_steps: int = opt(1, "server backend: give the server the new adapter every k optimizer steps")
    async_rollouts: bool = opt(False, "server backend: sample the next batch while training on this one, one "
                                      "step off-policy; the importance weights correct for it")
    tis_cap: float = opt(2.0, "server backend: cap of the truncated importance weight trainer / sampler, TIS")
    rollout_timeout: float = opt(600.0, "server backend: seconds one rollout request may take", resumable=True)

    def check(self) -> None:
        server = self.rollout_backend == "server"
        require([(self.max_completion_length >= 1 and self.temperature > 0,
                  "max_completion_length must be >= 1 and temperature > 0"),
                 (self.rollout_backend in ("local", "server"),
                  f"rollout_backend must be local or server, got {self.rollout_backend!r}"),
                 (not server or (self.rollout_url and self.rollout_model),
                  "rollout_backend server needs --rollout_url (the API root, http://HOST:PORT/v1) and "
                  "--rollout_model (the base model's name there)"),
                 (not server or self.lora_r > 0, "rollout_backend server gives the server the policy as a LoRA "
                                                 "adapter: train one (lora_r > 0)"),
                 (server or not self.async_rollouts, "async_rollouts needs rollout_backend server"),
                 (self.rollout_sync_steps >= 1 and self.tis_cap > 0 and self.rollout_timeout > 0,
                  "rollout_sync_steps must be >= 1, tis_cap and rollout_timeout > 0")])

    def saves_between_rollouts(self, updates: int, name: str) -> tuple[bool, str]:
        """The recipe's check that checkpoints fall between rollout batches, each serving ``updates`` optimizer steps
        (as ``name`` sets them). ``updates`` below 1 passes here: the recipe's own check of ``name`` says so."""
        return (updates < 1 or self.save_steps % updates == 0,
                f"save_steps ({self.save_steps}) must be a multiple of {name} ({updates}): a checkpoint inside a "
                f"rollout batch's updates could not be resumed exactly")


@dataclasses.dataclass
class DataSection:
    """Where a recipe's records come from and how they become tokens. ``DEMO_DATA`` / ``DEMO_EVAL``: the
    recipe's bundled demo files; ``RECORDS``: the kind of record it reads (what ``--dry_run`` checks the data
    against); ``answer_eval_dataset: auto`` means the demo eval set when training on the
    demo data."""

    DEMO_DATA: typing.ClassVar[Path | None] = None
    DEMO_EVAL: typing.ClassVar[Path | None] = None
    RECORDS: typing.ClassVar[str] = "sft"  # the kind of record the recipe reads: sft, preference, unpaired, prompt
    STEPS_KNOWN: typing.ClassVar[bool] = True  # False: what it trains on is made first (the steps are known then)
    dataset_name_or_path: str = opt("", "file, directory, saved dataset or hub name")
    eval_dataset: str | None = opt(None, "explicit validation data (else validation_split)")
    dataset_format: str | None = opt(None, "skip detection: messages, alpaca, text, preference, ...")
    skip_invalid: bool = opt(False, "count and skip broken records instead of failing")
    chat_template: str | None = opt(None, "a Jinja chat template file to use")
    max_seq_length: int = opt(128, "tokens per example (prompt + answer) and per packed row")
    packing: bool = opt(True, "examples as documents of one padding-free row, no cross-document attention "
                               "(false: padded rows)")
    pad_to_multiple_of: int = opt(0, "padded rows (packing false): round each batch's length up to a multiple "
                                      "of N, e.g. 8 for GPU tensor cores; 0 = off")
    truncation: str = opt("truncate", "truncate or drop over-long examples")
    answer_eval_dataset: str | None = opt("auto", "prompts with answers for greedy exact match; "
                                                   "auto = demo eval with demo data", resumable=True)
    max_new_tokens: int = opt(16, "generation budget of the exact-match eval", resumable=True)
    answer_pattern: str | None = opt(None, "exact match reads the answer out of each completion with this regular "
                                           "expression (its group, if it has one; the last match); none: the whole "
                                           "completion", resumable=True)

    def check(self) -> None:
        require([(self.truncation in ("truncate", "drop"), f"truncation must be truncate or drop, got {self.truncation!r}"),
                  (self.max_seq_length >= 2, f"max_seq_length must be >= 2, got {self.max_seq_length}"),
                  (self.pad_to_multiple_of >= 0, f"pad_to_multiple_of must be >= 0, got {self.pad_to_multiple_of}"),
                  (bool(self.dataset_name_or_path), "dataset_name_or_path is required")])
        check_paths(self, ("dataset_name_or_path", "eval_dataset", "answer_eval_dataset"), ("chat_template",))
        if self.chat_template:
            from minift.data.encode import read_chat_template

            read_chat_template(self.chat_template)
        if self.answer_pattern is not None:
            try:
                groups = re.compile(self.answer_pattern, re.M).groups
            except re.error as err:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} is not a regular expression: {err}") from None
            require([(groups <= 1, f"answer_pattern {self.answer_pattern!r} may have one group (the answer), not "
                                   f"{groups}")])
        if self.answer_eval_dataset == "auto":
            demo = self.DEMO_DATA is not None and Path(self.dataset_name_or_path).resolve() == self.DEMO_DATA
            self.answer_eval_dataset = str(self.DEMO_EVAL) if demo and self.DEMO_EVAL else None
