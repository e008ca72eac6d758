"""recipes/reward_model.py: a Bradley-Terry reward model (base + LoRA + scalar head) learns the demo pairs; its
merged directory is a reward source that scores exactly as the trained model did, and peft loads its adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _ProcessState, load_recipe

from minift.data.formats import normalize_all
from minift.data.read import train_eval_records
from minift.losses import reward_model_loss
from minift.train.rewards import load_reward


def test_bradley_terry_loss_by_hand():
    # s_c - s_r = [2, -1]: -log sigma(2) = log(1 + e^-2) = .126928; -log sigma(-1) = log(1 + e) = 1.313262
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert torch.allclose(reward_model_loss(c, r), torch.tensor([0.126928, 1.313262]), atol=1e-6)
    # margin 1 on the first pair: -log sigma(1) = .313262; centring .5 adds .5 * (s_c + s_r)^2 = [0, .5]
    assert torch.allclose(reward_model_loss(c, r, margin=torch.tensor([1.0, 0.0]), center_coefficient=0.5),
                          torch.tensor([0.313262, 1.813262]), atol=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        reward_model_loss(c, r[:1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rm = load_recipe("reward_model")
    out = tmp_path_factory.mktemp("rm")
    with _ProcessState():
        result = rm.main(rm.RewardConfig(output_dir=str(out), logging_steps=0))
    return rm, out, result


def test_reward_model_learns_the_demo_pairs(trained):
    """The defaults raise held-out pair accuracy from 54% to 70-75% (asserted: +12 points)."""
    _, _, result = trained
    assert result["pair_accuracy"] >= result["pair_accuracy_before"] + 0.12, result


def test_merged_reward_model_scores_as_trained(trained):
    """output_dir/merged loads as AutoModelForSequenceClassification, and GRPO's reward source (load_reward on it)
    ranks the held-out pairs exactly as the recipe's evaluation did: the training text is the scoring text."""
    rm, out, result = trained
    cfg = rm.RewardConfig(output_dir=str(out))
    records = train_eval_records(cfg.dataset_name_or_path, None, cfg.validation_split, cfg.seed)["eval"]
    examples = normalize_all(records, "preference").examples
    _, reward = load_reward(str(out / "merged"))
    chosen = reward([ex.prompt for ex in examples], [ex.chosen[0]["content"] for ex in examples])
    rejected = reward([ex.prompt for ex in examples], [ex.rejected[0]["content"] for ex in examples])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(examples)
    assert accuracy == pytest.approx(result["pair_accuracy"], abs=1.5 / len(examples))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]


def test_peft_loads_the_reward_adapter(trained, tiny_dir):
    """peft's PeftModel on AutoModelForSequenceClassification gives the merged model's scores (within 1e-5)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, out, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1,
                                                              pad_token_id=tokenizer.pad_token_id)
    ours = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    theirs = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = tokenizer(["Reverse the words: red cup cup red", "Reverse the words: a b b a"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        assert torch.allclose(ours(**ids).logits, theirs(**ids).logits, atol=1e-5)
