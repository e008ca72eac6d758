"""RL from AI feedback: a judge model compares the policy's own samples, and the policy learns from its verdicts.

    accelerate launch recipes/rlaif.py --init_adapter out/sft_weak/adapter --judge_model_name_or_path smollm2 \\
        --judge_adapter recipes/data/judge_smollm2     # the demo's judge (recipes/configs/judge_smollm2.yaml made it)
    accelerate launch recipes/rlaif.py ... --mode grpo                        # the judge's scores as GRPO's reward
    OPENAI_API_KEY=... accelerate launch recipes/rlaif.py ... --judge_api_base https://api.openai.com/v1 --judge_model gpt-4o-mini

Each step samples ``num_generations`` (k >= 2) completions of each prompt; the judge (a local causal LM with a
rubric, or any OpenAI-compatible endpoint) compares every two of a prompt's completions in both orders
(:class:`minift.train.judges.JudgeReward`: each completion's mean probability of beating the others). ``--mode
online_dpo`` trains DPO on each prompt's best vs worst completion, the reference being the start model (the
trainable adapter disabled); ``--mode grpo`` feeds the scores to GRPO as its reward (recipes/grpo.py's options
apply). Every ``eval_steps``, the judge compares the policy's greedy answers to held-out prompts with the start
model's: ``eval_win_rate``, and with reference answers ``eval_true_win_rate`` (right beats wrong, a tie counts
half). API judge calls are cached in ``output_dir/judge_cache``: a resumed run repeats none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from dpo import dpo_step
from grpo import GRPOBatches, GRPOConfig, grpo_step

from minift.config import require
from minift.data.packing import collate_flat, pack_pairs
from minift.infer.client import APIError, ChatClient
from minift.lora.layers import disable_adapters
from minift.model.load import load_tokenizer
from minift.train.forward import SequenceLogprobs, TokenLogprobs
from minift.train.generation import generate
from minift.train.judges import RUBRIC, APIJudge, JudgeReward, LocalJudge
from minift.train.pairs import PreferenceLoss, Reference
from minift.train.rewards import Rewards, load_reward
from minift.train.rollouts import Rollouts, load_prompts, rollout_params
from minift.train.stage import Stage, run_recipe
from minift.train.teacher import load_teacher

MODES = ("online_dpo", "grpo")


@dataclass
class RLAIFConfig(GRPOConfig):
    mode: str = field(default="online_dpo", metadata={"help": "online_dpo (best vs worst of each prompt) or grpo"})
    judge_model_name_or_path: str | None = field(default=None, metadata={"help": "a local judge: model directory, "
                                                                               ".gguf file, hub id, 'tiny' or 'smollm2'"})
    judge_adapter: list[str] = field(default_factory=list, metadata={"help": "adapters folded into the local judge"})
    judge_api_base: str | None = field(default=None, metadata={"help": "an API judge: an OpenAI-compatible endpoint"})
    judge_model: str | None = field(default=None, metadata={"help": "the API judge's model name"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable with the key"})
    judge_concurrency: int = field(default=4, metadata={"help": "API judge calls in flight at most"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds per API judge call before a retry"})
    judge_max_retries: int = field(default=4, metadata={"help": "retries of a failed API judge call"})
    judge_max_calls: int | None = field(default=None, metadata={"help": "API judge budget (none: no limit)"})
    judge_rubric: str = field(default=RUBRIC, metadata={"help": "what the judge is told to value"})
    dpo_loss_type: str = field(default="sigmoid", metadata={"help": "online_dpo: a DPO loss type"})
    dpo_beta: float = field(default=0.1, metadata={"help": "online_dpo: DPO's beta"})
    dpo_rpo_alpha: float = field(default=0.0, metadata={"help": "online_dpo: weight of the chosen completions' NLL "
                                                                 "(iterative RPO, Pang et al. 2024)"})
    num_generations: int = field(default=2, metadata={"help": "completions per prompt (k)"})
    reward: list[str] = field(default_factory=list, metadata={"help": "rewards added to the judge's score (e.g. "
                                                                      "think_format), comma-separated"})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "their weights (none given: 1 each; "
                                                                                "the judge's is 1)"})
    output_dir: str = "out/rlaif"
    per_device_train_batch_size: int = 32
    learning_rate: float = 5e-4
    num_train_epochs: float = 1.0
    eval_steps: int = 50

    def batch_plan(self) -> tuple[int, int]:
        return self.per_device_train_batch_size // self.num_generations, self.num_iterations if self.mode == "grpo" else 1

    def check(self) -> None:
        local, api = bool(self.judge_model_name_or_path), bool(self.judge_api_base)
        checks = [(self.mode in MODES, f"mode must be online_dpo or grpo, got {self.mode!r}"),
                  (local != api, "give one judge: --judge_model_name_or_path (local) or --judge_api_base with "
                                 "--judge_model (an OpenAI-compatible endpoint)"),
                  (not api or bool(self.judge_model), "judge_api_base needs judge_model"),
                  (self.mode == "grpo" or self.lora_r > 0, "online DPO's reference is the start model, which a full "
                                                           "fine-tune (lora_r 0) does not keep: train an adapter"),
                  (self.mode == "grpo" or self.rollout_backend == "local",
                   "rollout_backend server samples GRPO's rollouts: use it with --mode grpo (online DPO samples "
                   "its pairs itself)")]
        require(checks)
        PreferenceLoss(self.dpo_loss_type, self.dpo_beta, rpo_alpha=self.dpo_rpo_alpha)  # checks the three


def make_judge(cfg: RLAIFConfig, device):
    """The configured judge: a frozen local LM (adapters folded in) or an API endpoint behind a cached client."""
    if cfg.judge_api_base:
        client = ChatClient(cfg.judge_api_base, cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                            timeout=cfg.judge_timeout, max_retries=cfg.judge_max_retries,
                            concurrency=cfg.judge_concurrency, max_calls=cfg.judge_max_calls,
                            cache_dir=Path(cfg.output_dir) / "judge_cache")
        return APIJudge(client, cfg.judge_rubric)
    tokenizer = load_tokenizer(cfg.judge_model_name_or_path)
    model = load_teacher(cfg.judge_model_name_or_path, tokenizer, adapters=cfg.judge_adapter).to(device)
    return LocalJudge(model, tokenizer, cfg.judge_rubric)


class OnlineDPOBatches:
    """``make(prompts, seeds, refill)``: k completions of each prompt, scored by the judge; each prompt's best and
    worst completion become a preference pair, packed for :func:`dpo.dpo_step`."""

    def __init__(self, cfg: RLAIFConfig, model, tokenizer, rewards: Rewards):
        self.rollouts = Rollouts(model, tokenizer, rewards, rollout_params(cfg), cfg.num_generations)
        self.cfg, self.names = cfg, []

    @torch.no_grad()
    def __call__(self, prompts: list[dict], seeds: list[int], refill=None) -> dict:
        k = self.cfg.num_generations
        batch, metrics = self.rollouts(prompts, seeds)
        scores = batch["rewards"].view(-1, k)
        best, worst = scores.argmax(1), scores.argmin(1)
        pairs = []
        # A prompt whose completions scored the same gives no preference (and RPO's NLL would train an arbitrary
        # one): it is left out, unless every prompt of the batch tied.
        tied = (scores.max(1).values - scores.min(1).values) <= 0
        for i, (b, w) in enumerate(zip(best.tolist(), worst.tolist())):
            if tied[i] and not tied.all():
                continue
            sides = {}
            for side, j in (("chosen", b), ("rejected", w)):
                row = batch["input_ids"][i * k + j][batch["attention_mask"][i * k + j].bool()].tolist()
                labels = batch["labels"][i * k + j][: len(row)].tolist()
                sides.update({f"{side}_input_ids": row, f"{side}_labels": labels})
            pairs.append({**sides, "index": i})
        metrics["score_margin"] = (scores.max(1).values - scores.min(1).values).mean().item()
        metrics["tied"] = tied.float().mean().item()
        rows, _ = pack_pairs(pairs, max(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs))
        out = collate_flat(rows)
        out["pair_index"] = torch.arange(len(pairs))
        self.names = self.rollouts.packed(out, metrics)
        return out


def win_rate(accelerator, model, tokenizer, judge, held_out: list[dict], max_new_tokens: int, adapter: str) -> dict:
    """The judge's mean P(policy beats start model) on held-out prompts (greedy answers), and with reference answers
    the true win rate (right beats wrong; a tie counts half). Each process takes a share; sums over processes."""
    mine = held_out[accelerator.process_index::accelerator.num_processes]
    sums = torch.zeros(3, dtype=torch.float64)
    if mine:
        ids, main = [p["input_ids"] for p in mine], accelerator.is_main_process
        policy = tokenizer.batch_decode(generate(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                                 desc="win rate: policy" if main else None), skip_special_tokens=True)
        with disable_adapters(model, [adapter]):
            start = tokenizer.batch_decode(generate(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                                    desc="win rate: start model" if main else None),
                                           skip_special_tokens=True)
        judged = judge.compare([p["prompt"] for p in mine], [t.strip() for t in policy], [t.strip() for t in start])
        truth = [0.5 + 0.5 * ((a.strip() == p["fields"]["answer"]) - (b.strip() == p["fields"]["answer"]))
                 for a, b, p in zip(policy, start, mine) if "answer" in p["fields"]]
        sums += torch.tensor([sum(judged), sum(truth), len(mine)], dtype=torch.float64)
    total = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    rate = (total[0] / total[2]).item()
    out = {"eval_loss": 1.0 - rate, "eval_win_rate": rate}
    if held_out and "answer" in held_out[0]["fields"]:
        out["eval_true_win_rate"] = (total[1] / total[2]).item()
    return out


def main(cfg: RLAIFConfig) -> dict:
    stage = Stage(cfg, "rlaif", unit="completions")
    accelerator, tokenizer = stage.accelerator, stage.load_tokenizer()
    extra = [load_reward(s, max_completion_length=cfg.max_completion_length) for s in cfg.reward]
    judge = make_judge(cfg, accelerator.device)
    rewards = Rewards([("judge", JudgeReward(judge, cfg.num_generations)), *extra], [1.0, *(cfg.reward_weights or
                                                                                             [1.0] * len(extra))])
    prompts, data_report = load_prompts(cfg.dataset_name_or_path, tokenizer, rewards, max_length=cfg.max_seq_length,
                                        fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid)
    held_out = load_prompts(cfg.answer_eval_dataset, tokenizer, Rewards(rewards.functions[:1]),
                            max_length=cfg.max_seq_length)[0] if cfg.answer_eval_dataset else []
    model = stage.load_model()
    if cfg.mode == "grpo":
        logps_model = TokenLogprobs(model)
        make = GRPOBatches(cfg, logps_model, tokenizer, rewards, stage.adapter_name)
    else:
        logps_model = SequenceLogprobs(model)
        make = OnlineDPOBatches(cfg, model, tokenizer, rewards)
        reference = Reference(logps_model, stage.adapter_name)
        preference = PreferenceLoss(cfg.dpo_loss_type, cfg.dpo_beta, rpo_alpha=cfg.dpo_rpo_alpha)
    batches = stage.online_batches(prompts, make)
    evaluate = (lambda _: win_rate(accelerator, model, tokenizer, judge, held_out, cfg.max_completion_length,
                                   stage.adapter_name)) if held_out else None
    wrapper = stage.prepare(logps_model, batches, evaluate=evaluate)
    stage.resume()
    per_step = stage.rows_per_step
    for window in stage.steps():
        if cfg.mode == "grpo":
            loss, record = grpo_step(accelerator, wrapper, cfg, window, make.names)
        else:
            rollout = Rollouts.window_means(accelerator, window, make.names)
            record = dpo_step(accelerator, wrapper, reference, preference, window, per_step // cfg.num_generations)
            record.update(rollout)
            loss = record["loss"]
        stage.update(loss, record, units=per_step)
    return stage.finish(data=data_report)


if __name__ == "__main__":
    run_recipe(main, RLAIFConfig, __doc__, errors=(APIError,))
