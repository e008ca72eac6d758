"""Rollouts for online recipes: G sampled completions per prompt from the current policy, scored by the rewards,
laid out as one padded batch (prompt tokens labelled IGNORE_INDEX, completion tokens as labels).

With dynamic sampling (DAPO, Yu et al. 2025, 2503.14476), groups whose rewards are all equal (zero advantage:
they teach nothing) are dropped and the batch is refilled with informative groups of further prompts; after
``max_refills`` draws it is topped up with dropped groups, so every micro-batch keeps its shape.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch

from minift.constants import IGNORE_INDEX
from minift.data.formats import normalize_all
from minift.data.packing import collate_padded
from minift.data.read import load_records
from minift.lora.merge import folded_adapters
from minift.losses import informative_groups
from minift.sections import RolloutSection
from minift.train.remote import ServerSampler
from minift.train.rewards import Rewards, load_reward
from minift.train.sampling import Completion, SamplingParams, sample
from minift.train.sharding import gathered

# refill(attempt) -> (prompts, seeds) of the attempt-th further draw (attempt = 1, 2, ...)
Refill = Callable[[int], tuple[list[dict], list[int]]]


@dataclass
class _Scored:
    """Completions (prompt-major, ``G`` per prompt) with their prompts' records and rewards."""

    completions: list[Completion]
    owners: list[dict]
    total: torch.Tensor
    values: dict[str, list[float | None]]

    def groups(self, keep: torch.Tensor, G: int) -> _Scored:
        """The groups where ``keep`` (``(groups,)`` bool) is True, in order."""
        rows = [k for k in range(len(self.completions)) if keep[k // G]]
        return _Scored([self.completions[k] for k in rows], [self.owners[k] for k in rows], self.total[rows],
                       {name: [v[k] for k in rows] for name, v in self.values.items()})

    def __add__(self, other: _Scored) -> _Scored:
        return _Scored(self.completions + other.completions, self.owners + other.owners,
                       torch.cat([self.total, other.total]),
                       {name: v + other.values[name] for name, v in self.values.items()})


def load_prompts(path: str, tokenizer, rewards: Rewards, *, max_length: int, fmt: str | None = None,
                 skip_invalid: bool = False) -> tuple[list[dict], dict]:
    """An online recipe's prompt records, with the fields the rewards need (checked, file:line) ->
    ``{"input_ids", "prompt", "fields"}`` rows rendered with the chat template, and a report (prompts over
    ``max_length`` tokens are dropped and counted)."""
    records = load_records(path, "train")
    rewards.check_records(records)
    norm = normalize_all(records, "prompt", fmt=fmt, skip_invalid=skip_invalid)
    rows, too_long = [], 0
    for ex in norm.examples:
        text = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            too_long += 1
            continue
        prompt = ex.messages[0]["content"] if len(ex.messages) == 1 else ex.messages
        rows.append({"input_ids": ids, "prompt": prompt, "fields": ex.extra})
    return rows, {"prompts": len(rows), "dropped_too_long": too_long, "skipped_invalid": len(norm.skipped)}


def online_inputs(cfg, tokenizer) -> tuple[Rewards, list[dict], dict]:
    """A reward-trained recipe's rewards (``--reward``, weighted by ``--reward_weights``) and its training prompts
    with their report (:func:`load_prompts`): GRPO's and PPO's. Called before any weights load, so that bad data or
    a bad reward fails first."""
    rewards = Rewards([load_reward(s, max_completion_length=cfg.max_completion_length) for s in cfg.reward],
                      cfg.reward_weights)
    prompts, report = load_prompts(cfg.dataset_name_or_path, tokenizer, rewards, max_length=cfg.max_seq_length,
                                   fmt=cfg.dataset_format, skip_invalid=cfg.skip_invalid)
    return rewards, prompts, report


def rollout_params(cfg: RolloutSection) -> SamplingParams:
    """The sampling options of an online recipe's rollouts."""
    return SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, min_p=cfg.min_p)


@contextmanager
def sampling_model(model):
    """``model`` as the sampler wants it: whole on this process (under FSDP / ZeRO-3 each process then samples
    alone; every process must enter, the gathering is a collective) and with its adapters folded into its weights
    (:func:`~minift.lora.merge.folded_adapters`: a faster decoding step)."""
    with gathered(model), folded_adapters(model):
        yield model


class Rollouts:
    """``rollouts(prompts, seeds, refill)`` -> ``(batch, metrics)``.

    ``prompts``: records with ``input_ids`` (the rendered prompt), ``prompt`` (what rewards see) and ``fields``
    (record fields rewards may ask for); ``seeds[i]`` seeds prompt i's completions (completion j draws from
    ``row_seed(seeds[i], j)``). ``batch``: ``input_ids``, ``attention_mask``, ``labels``, ``sampler_logps`` (the
    sampler's log-probs of the completion tokens at temperature 1, ``(B, T - 1)`` as
    :class:`~minift.train.forward.TokenLogprobs` lays them out), ``rewards`` (the weighted total, ``(B,)``) and
    ``truncated`` (completions cut at ``max_new_tokens``). With a ``server`` (:class:`ServerSampler`, which the
    stage sets) the server samples and ``sampler_logps`` are its own. ``metrics``: each reward's mean and
    std, completion length mean and max, the share truncated, seconds sampling (``generate_s``) and in all
    (``rollout_s``: sampling and rewards), sampled tokens/s; with dynamic sampling also the first draw's share
    of informative groups and the refills made; from a server, ``staleness`` and ``adapter_sync_s``.
    """

    def __init__(self, model, tokenizer, rewards: Rewards, params: SamplingParams, group_size: int, *,
                 dynamic_sampling: bool = False, max_refills: int = 4):
        self.model, self.tokenizer, self.rewards, self.params, self.G = model, tokenizer, rewards, params, group_size
        self.dynamic_sampling, self.max_refills = dynamic_sampling, max_refills
        self.server: ServerSampler | None = None  # set by Stage.online_batches with --rollout_backend server
        self.sampling_s = 0.0  # seconds in the sampler (or waiting for the server), all calls

    def _request(self, prompts: list[dict], seeds: list[int]) -> tuple[list[list[int]], list[SamplingParams]]:
        return [p["input_ids"] for p in prompts], [replace(self.params, seed=s) for s in seeds]

    def at(self, window: int, steps_per_window: int, upcoming) -> None:
        """Where the run stands, for a server sampler (see :meth:`ServerSampler.at`); ``upcoming()`` gives the next
        window's ``(prompts, seeds)`` here."""
        if self.server is not None:
            self.server.at(window, steps_per_window, upcoming and (lambda: self._request(*upcoming())))

    def draw(self, prompts: list[dict], seeds: list[int]) -> _Scored:
        """G completions of each prompt, scored."""
        ids, params = self._request(prompts, seeds)
        start = time.perf_counter()
        if self.server is not None:
            completions = self.server(ids, params, self.G)
        else:
            completions = sample(self.model, self.tokenizer, ids, params, n=self.G)
        self.sampling_s += time.perf_counter() - start
        owners = [prompts[k // self.G] for k in range(len(completions))]
        fields = {key: [p["fields"].get(key) for p in owners] for key in prompts[0]["fields"]}
        total, values = self.rewards([p["prompt"] for p in owners], [c.text for c in completions],
                                     [c.token_ids for c in completions], fields, self.G)
        return _Scored(completions, owners, total, values)

    @torch.no_grad()
    def __call__(self, prompts: list[dict], seeds: list[int], refill: Refill | None = None) -> tuple[dict, dict]:
        start, sampled_before = time.perf_counter(), self.sampling_s
        with sampling_model(self.model) if self.server is None else nullcontext():
            scored = self.draw(prompts, seeds)
            extra = {}
            if self.dynamic_sampling:
                scored, extra = self._fill(scored, len(prompts), refill)
        generating = self.sampling_s - sampled_before
        completions = scored.completions
        batch = collate_padded([{"input_ids": c.prompt_ids + c.token_ids,
                                 "labels": [IGNORE_INDEX] * len(c.prompt_ids) + c.token_ids} for c in completions],
                               self.tokenizer.pad_token_id)
        lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
        labelled = batch["labels"][:, 1:] != IGNORE_INDEX  # TokenLogprobs' layout: position t scores token t + 1
        sampled = torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float32)
        batch["sampler_logps"] = torch.zeros(labelled.shape).masked_scatter(labelled, sampled)
        batch["rewards"] = scored.total
        batch["truncated"] = torch.tensor([c.finish_reason == "length" for c in completions])
        metrics = {**Rewards.metrics(scored.total, scored.values), "completion_length": lengths.mean().item(),
                   "completion_length_max": lengths.max().item(), "truncated": batch["truncated"].float().mean().item(),
                   **extra, **(self.server.metrics() if self.server else {}),
                   "sampled_tokens_per_s": lengths.sum().item() / max(generating, 1e-9),
                   "generate_s": generating, "rollout_s": time.perf_counter() - start}
        return batch, metrics

    def packed(self, batch: dict, metrics: dict) -> list[str]:
        """Put a batch's rollout ``metrics`` in ``batch["metrics"]`` as one float64 tensor (what the stage kit moves
        with the batch) and return their names. The seconds are left out: the stage logs the step's share spent
        sampling from :attr:`sampling_s`."""
        kept = {k: v for k, v in metrics.items() if k not in ("generate_s", "rollout_s")}
        batch["metrics"] = torch.tensor(list(kept.values()), dtype=torch.float64)
        return list(kept)

    @staticmethod
    def window_means(accelerator, window: list[dict], names: list[str]) -> dict[str, float]:
        """The rollout metrics :meth:`packed` put in each micro-batch of ``window`` (taken out of the batches),
        averaged over the micro-batches and the processes, by name."""
        means = torch.stack([batch.pop("metrics") for batch in window]).mean(0).to(accelerator.device)
        return dict(zip(names, accelerator.reduce(means, "mean").tolist()))

    def _fill(self, scored: _Scored, groups: int, refill: Refill | None) -> tuple[_Scored, dict]:
        """Keep the informative groups; refill from further prompts; top up with dropped groups if still short."""
        G = self.G
        informative = informative_groups(scored.total, G)
        kept, attempt = scored.groups(informative, G), 0
        while len(kept.completions) < groups * G and refill is not None and attempt < self.max_refills:
            attempt += 1
            more = self.draw(*refill(attempt))
            kept = kept + more.groups(informative_groups(more.total, G), G)
        if len(kept.completions) < groups * G:  # zero-advantage groups: no gradient, but the batch keeps its shape
            kept = kept + scored.groups(~informative, G)
        keep = torch.arange(len(kept.completions) // G) < groups
        return kept.groups(keep, G), {"informative_groups": informative.float().mean().item(), "refills": attempt}
