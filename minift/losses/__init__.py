"""Losses as pure functions of tensors (torch only): each module can be copied into another project as is.

- ``lm_head``: cross-entropy and token log-probs through the LM head, chunked so ``(N, V)`` logits never exist;
  summed / mean completion log-probs from logits without a float32 ``(B, T, V)`` copy
- ``preference``: DPO and its variants (IPO, hinge, robust, EXO, NCA, BCO, SPPO, APO), SimPO, CPO, ORPO, KTO;
  the Bradley-Terry reward-model loss
- ``policy``: online RL from sampled groups: GRPO / Dr. GRPO / RLOO advantages, KL estimators, the clipped
  GRPO surrogate (DAPO clip-higher, GSPO sequence ratios; grpo / bnpo / dr_grpo / dapo aggregation)
- ``ppo``: PPO with a value function: KL-penalized per-token rewards, GAE, whitening, clipped policy and value
  losses, the adaptive KL controller
- ``distill``: knowledge distillation: forward / reverse KL and the generalized JSD, against full teacher
  logits or a top-k teacher with a tail bucket; chunked through the LM heads so (N, V) logits never exist
"""

from minift.losses.distill import (
    chunked_distill_loss,
    distill_divergence,
    sparse_distill_divergence,
)
from minift.losses.lm_head import (
    chunked_cross_entropy,
    completion_logprobs,
    token_logprobs,
)
from minift.losses.policy import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    informative_groups,
    kl_per_token,
    rloo_advantages,
    rloo_rewards,
)
from minift.losses.ppo import (
    AdaptiveKLController,
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_moments,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from minift.losses.preference import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
)

__all__ = ["chunked_cross_entropy", "token_logprobs", "completion_logprobs",
           "DPO_LOSS_TYPES", "dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "kto_loss", "reward_model_loss",
           "GRPO_LOSS_TYPES", "group_advantages", "rloo_advantages", "informative_groups", "kl_per_token",
           "rloo_rewards", "grpo_loss", "kl_penalized_rewards", "gae_advantages", "masked_mean", "masked_moments",
           "masked_whiten",
           "ppo_policy_loss", "ppo_value_loss", "AdaptiveKLController", "distill_divergence",
           "sparse_distill_divergence", "chunked_distill_loss"]
