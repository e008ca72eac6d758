"""Logit distillation: a student (LoRA, or a full fine-tune) learns a frozen teacher's next-token distributions.

    accelerate launch recipes/sft.py --output_dir out/sft                       # a teacher: the SFT demo (95%)
    accelerate launch recipes/distill.py --teacher_model_name_or_path tiny --teacher_adapter out/sft/adapter
    accelerate launch recipes/distill.py ... --mode on_policy --lmbda 0.5      # GKD: the student samples half
    accelerate launch recipes/distill.py ... --teacher_cache out/teacher_top20.safetensors   # top-k, computed once
    accelerate launch recipes/distill.py ... --mode sequence                   # SFT on the teacher's greedy answers

The loss is the generalized JSD at ``temperature`` (``beta`` 0: forward KL(teacher ‖ student), 1: reverse KL,
between: GKD's mixture) over the trained tokens, through both LM heads a chunk of positions at a time, so no
``(tokens, vocab)`` logits exist whole. ``mode``: ``offline`` (the dataset's completions, packed),
``on_policy`` (each example's completion sampled by the student with probability ``lmbda``, else the
dataset's; Agarwal et al. 2024, GKD) or ``sequence`` (Kim & Rush 2016: cross-entropy on the teacher's greedy
completions, generated once and cached in ``output_dir/teacher_generations.jsonl``). The teacher may also be a
file of its top-k log-probs (``teacher_cache``; a tail bucket holds the rest), written from the teacher on the
first run. Before any weights load, the two tokenizers must agree: embeddings padded past the tokenizer are
sliced to the rows both have; other vocabularies are refused, naming the first differing ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sft import SFTConfig, build_data, sft_step

from minift.config import require
from minift.data.packing import collate_flat, collate_padded, pack_examples
from minift.model.vocab import shared_vocabulary
from minift.train.forward import CausalLMLoss, DistillLoss
from minift.train.rollouts import sampling_model
from minift.train.sampling import SamplingParams, row_seed, sample
from minift.train.stage import Stage, run_recipe
from minift.train.teacher import (
    Teacher,
    TopKCache,
    load_teacher,
    plain_head,
    prompt_of,
    teacher_completions,
    teacher_identity,
    teacher_key,
    with_completion,
)

MODES = ("offline", "on_policy", "sequence")


@dataclass
class DistillConfig(SFTConfig):
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "the teacher: a model directory, .gguf file, hub id or 'tiny' (same tokenizer as the student)"})
    teacher_adapter: list[str] = field(default_factory=list, metadata={
        "help": "adapters folded into the teacher, in order, comma-separated"})
    teacher_dtype: str = field(default="float32", metadata={"help": "teacher weights dtype"})
    teacher_quantization: str | None = field(default=None, metadata={"help": "4bit or 8bit teacher (bitsandbytes)"})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "offline mode: a file of the teacher's top-k log-probs, read if it matches, else written first"})
    teacher_top_k: int = field(default=20, metadata={"help": "k of teacher_cache"})
    mode: str = field(default="offline", metadata={"help": "offline, on_policy or sequence"})
    lmbda: float = field(default=0.5, metadata={"help": "on_policy: share of completions the student samples"})
    beta: float = field(default=0.0, metadata={"help": "generalized JSD: 0 forward KL, 1 reverse KL"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both models (and of "
                                                                "on-policy sampling)"})
    max_completion_length: int = field(default=32, metadata={"help": "new tokens per sampled or teacher completion"})
    output_dir: str = "out/distill"
    # The demo: a fresh LoRA student distilled from the SFT demo's teacher (95%); see the README for its figures.
    num_train_epochs: float = 10.0
    REAL_MODEL = {**SFTConfig.REAL_MODEL, "max_completion_length": 256}

    def check(self) -> None:
        checks = [(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
                  (0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}"),
                  (self.temperature > 0 and 0.0 <= self.lmbda <= 1.0, "temperature must be > 0 and lmbda in [0, 1]"),
                  (self.teacher_top_k >= 1 and self.max_completion_length >= 1,
                   "teacher_top_k and max_completion_length must be >= 1"),
                  (self.teacher_quantization in (None, "4bit", "8bit"), "teacher_quantization must be 4bit or 8bit"),
                  (bool(self.teacher_model_name_or_path or self.teacher_cache),
                   "give the teacher: --teacher_model_name_or_path (and --teacher_adapter), or --teacher_cache"),
                  (not self.teacher_cache or self.mode == "offline", "teacher_cache serves the offline mode only: "
                                                                      "other modes score new completions"),
                  (self.train_on == "completion" or self.mode == "offline",
                   "on_policy and sequence modes need prompts: train_on must be completion")]
        require(checks)
        if self.teacher_cache and not self.teacher_model_name_or_path and not Path(self.teacher_cache).is_file():
            raise FileNotFoundError(f"teacher_cache {self.teacher_cache} does not exist; give "
                                    f"--teacher_model_name_or_path to write it first")
        for adapter in self.teacher_adapter:
            if not Path(adapter).is_dir():
                raise FileNotFoundError(f"teacher_adapter {adapter} does not exist")


class OnPolicyBatches:
    """``make(rows, seeds, refill)``: the on-policy micro-batch. Example k's completion is sampled by the student
    (seeded by its seed) when ``u(seed) < lmbda``, else it is the dataset's, so any number of processes and a
    resume make the same batch."""

    def __init__(self, cfg: DistillConfig, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer

    def __call__(self, rows: list[dict], seeds: list[int], refill=None) -> dict:
        cfg = self.cfg
        own = [row_seed(s, 7) / 2**63 < cfg.lmbda for s in seeds]
        picked = [k for k, yes in enumerate(own) if yes]
        params = [SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, seed=seeds[k])
                  for k in picked]
        with sampling_model(self.model):  # every process, even one with nothing to sample (FSDP: a collective)
            sampled = sample(self.model, self.tokenizer, [prompt_of(rows[k]) for k in picked], params) if picked else []
        examples = [dict(row) for row in rows]
        for k, c in zip(picked, sampled):
            examples[k] = with_completion(prompt_of(rows[k]), c.token_ids)
        batch = collate_padded(examples, self.tokenizer.pad_token_id)
        batch["sampled"] = torch.tensor(own, dtype=torch.float64)
        return batch


def main(cfg: DistillConfig) -> dict:
    stage = Stage(cfg, "distill")
    accelerator, tokenizer = stage.accelerator, stage.load_tokenizer()
    vocab = shared_vocabulary(cfg.model_name_or_path, cfg.teacher_model_name_or_path) \
        if cfg.teacher_model_name_or_path else len(tokenizer)  # before any weights load
    train, held_out, _, data_report = build_data(dataclasses.replace(cfg, packing=False), tokenizer)
    packed = cfg.packing and cfg.mode != "on_policy"
    pad = tokenizer.pad_token_id
    collate = collate_flat if packed else (lambda rows: collate_padded(rows, pad))
    teacher_model = load_teacher(cfg.teacher_model_name_or_path, tokenizer, adapters=cfg.teacher_adapter,
                                 dtype=cfg.teacher_dtype, quantization=cfg.teacher_quantization
                                 ).to(accelerator.device) if cfg.teacher_model_name_or_path else None
    teacher = Teacher(teacher_model, accelerator.autocast)
    if cfg.mode == "sequence":
        identity = teacher_identity(cfg.teacher_model_name_or_path, cfg.teacher_adapter, cfg.teacher_dtype)
        train = teacher_completions(teacher_model, tokenizer, train, Path(cfg.output_dir) / "teacher_generations.jsonl",
                                    accelerator, identity, cfg.max_completion_length)
    rows = {"train": train, "eval": held_out}
    if packed:
        rows = {split: pack_examples(r, cfg.max_seq_length)[0] if r else [] for split, r in rows.items()}
    cache = None
    if cfg.teacher_cache:
        key = teacher_key(rows, teacher=cfg.teacher_model_name_or_path, adapters=cfg.teacher_adapter,
                          dtype=cfg.teacher_dtype, k=cfg.teacher_top_k)
        cache = TopKCache.load_or_compute(Path(cfg.teacher_cache), key, accelerator, teacher, rows, collate,
                                          cfg.teacher_top_k, vocab, cfg.per_device_eval_batch_size)
        for split, split_rows in rows.items():
            for i, row in enumerate(split_rows):
                row["cache_index"] = i

    def collate_split(split: str):
        if cache is None:
            return collate
        return lambda batch_rows: cache.attach(collate(batch_rows), split, [r["cache_index"] for r in batch_rows])

    model = stage.load_model()
    if cfg.mode == "on_policy":
        batches = stage.online_batches(train, OnPolicyBatches(cfg, model, tokenizer), what="examples")
    else:
        batches = stage.fixed_batches(rows["train"], collate_split("train"),
                                      what="packed rows" if packed else "examples")
    head = teacher.head if cache is None else None
    distill = DistillLoss(model, head, beta=cfg.beta, temperature=cfg.temperature, vocab_size=vocab)
    plain_head(model, "student")
    world = accelerator.num_processes
    eval_batches = [collate_split("eval")(rows["eval"][i: i + cfg.per_device_eval_batch_size])
                    for i in range(0, len(rows["eval"]), cfg.per_device_eval_batch_size)][accelerator.process_index::world]

    @torch.no_grad()
    def evaluate(_=None) -> dict:
        """The divergence trained (eval_loss) and the forward KL(teacher ‖ student) per held-out token."""
        sums, was_training = torch.zeros(3, dtype=torch.float64), distill.training
        distill.eval()
        with accelerator.autocast():
            for batch in eval_batches:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                inputs = {**batch, **teacher(batch)}
                loss, n = distill(**inputs)
                sums += torch.tensor([loss.item(), distill(**inputs, beta=0.0)[0].item(), n], dtype=torch.float64)
        distill.train(was_training)
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        return {"eval_loss": (sums[0] / sums[2]).item(), "eval_kl": (sums[1] / sums[2]).item()}

    wrapper = stage.prepare(CausalLMLoss(model) if cfg.mode == "sequence" else distill, batches,
                            evaluate=evaluate if rows["eval"] else None)  # a process may have no eval batch
    if stage.resume() == 0:
        if rows["eval"]:
            with stage.gathered():
                stage.state["before"]["eval_kl_before"] = evaluate()["eval_kl"]
        if teacher_model is not None and accelerator.is_main_process:
            stage.state["before"].update({f"teacher_{k}": v for k, v in stage.answer_metrics(teacher_model).items()})
    for window in stage.steps():
        sampled = [b.pop("sampled") for b in window if "sampled" in b]
        if cfg.mode != "sequence":
            window = [{**b, **teacher(b)} for b in window]
        loss, n_tokens = sft_step(accelerator, wrapper, window)
        record = {"loss": loss}
        if sampled:
            record["sampled_share"] = accelerator.reduce(torch.cat(sampled).mean().to(accelerator.device), "mean").item()
        stage.update(loss, record, units=n_tokens)
    return stage.finish(data=data_report)


if __name__ == "__main__":
    run_recipe(main, DistillConfig, __doc__)
