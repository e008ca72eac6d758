"""minift.train.rollouts: G scored completions per prompt as one padded batch; dynamic sampling keeps only
informative groups, refilling from further prompts and topping up with dropped groups when they run out."""

from __future__ import annotations

import torch

from minift.constants import IGNORE_INDEX
from minift.model.load import load_model_and_tokenizer
from minift.train.forward import TokenLogprobs
from minift.train.rewards import Rewards
from minift.train.rollouts import Rollouts
from minift.train.sampling import SamplingParams


def flat_or_varied(prompts, completions, kind, **_):
    """0 for every completion of a "flat" prompt (an uninformative group); 1 + the text's length otherwise."""
    return [0.0 if k == "flat" else 1.0 + len(c) for c, k in zip(completions, kind)]


def _rollouts(tiny_dir, **options) -> tuple[Rollouts, object]:
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    return Rollouts(model, tok, Rewards([("kind", flat_or_varied)]), params, 4, **options), tok


def _prompts(tok, kinds: list[str]) -> list[dict]:
    return [{"input_ids": tok(f"prompt {i} {k}")["input_ids"], "prompt": f"prompt {i} {k}", "fields": {"kind": k}}
            for i, k in enumerate(kinds)]


def test_batch_layout_and_metrics(tiny_dir):
    rollouts, tok = _rollouts(tiny_dir)
    prompts = _prompts(tok, ["varied", "flat"])
    batch, metrics = rollouts(prompts, [1, 2])
    assert batch["input_ids"].shape[0] == 8 and batch["rewards"].shape == (8,) and batch["truncated"].dtype == torch.bool
    for row, prompt in zip(range(8), [p for p in prompts for _ in range(4)]):
        labels = batch["labels"][row][batch["attention_mask"][row].bool()]
        n = len(prompt["input_ids"])
        assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] != IGNORE_INDEX).all()
    assert batch["rewards"][4:].eq(0).all() and metrics["completion_length_max"] <= 6
    assert {"reward", "rewards/kind/mean", "truncated", "generate_s", "sampled_tokens_per_s"} <= set(metrics)
    again, _ = rollouts(prompts, [1, 2])
    assert torch.equal(again["input_ids"], batch["input_ids"])  # seeded: the same rollouts
    with torch.no_grad():  # the sampler's log-probs sit where the training forward puts its own
        logps = TokenLogprobs(rollouts.model)(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    assert (logps - batch["sampler_logps"]).abs().max() < 1e-4 and (batch["sampler_logps"] < 0).sum() > 8


def test_dynamic_sampling_refills_with_informative_groups(tiny_dir):
    rollouts, tok = _rollouts(tiny_dir, dynamic_sampling=True, max_refills=2)
    asked = []

    def refill(attempt):
        asked.append(attempt)
        return _prompts(tok, ["flat", "varied"]), [10 + attempt, 20 + attempt]

    batch, metrics = rollouts(_prompts(tok, ["varied", "flat"]), [1, 2], refill)
    assert asked == [1] and metrics["refills"] == 1 and metrics["informative_groups"] == 0.5
    assert batch["input_ids"].shape[0] == 8 and (batch["rewards"] > 0).all()  # both groups informative
    groups = batch["rewards"].view(2, 4)
    assert (groups != groups[:, :1]).any(dim=1).all()


def test_dynamic_sampling_tops_up_with_dropped_groups_after_max_refills(tiny_dir):
    rollouts, tok = _rollouts(tiny_dir, dynamic_sampling=True, max_refills=2)
    batch, metrics = rollouts(_prompts(tok, ["varied", "flat"]), [1, 2],
                              lambda attempt: (_prompts(tok, ["flat"]), [30 + attempt]))
    assert metrics["refills"] == 2 and batch["input_ids"].shape[0] == 8
    assert (batch["rewards"][:4] > 0).all() and batch["rewards"][4:].eq(0).all()  # the flat group fills the gap
    batch, metrics = rollouts(_prompts(tok, ["flat", "flat"]), [1, 2], None)  # no refill source: kept as drawn
    assert metrics["refills"] == 0 and metrics["informative_groups"] == 0 and batch["input_ids"].shape[0] == 8
