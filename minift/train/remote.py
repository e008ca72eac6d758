"""Rollouts sampled by an inference server (``--rollout_backend server``): minift's own (``tools/serve.py``) or
vLLM, through the OpenAI completions API.

Before a rollout window is sampled (every ``rollout_sync_steps`` optimizer steps), the main process writes the
policy's adapter in the PEFT format where the server reads it (a frozen ``--init_adapter`` chain folded in,
exactly: :func:`~minift.lora.merge.combine_adapters`) and asks the server to load it under a new name
(``POST /v1/load_lora_adapter``, vLLM's runtime LoRA updating). Each prompt's G completions are one request,
seeded as local rollouts are, answered with the sampler's log-probs of every token it drew
(``return_tokens_as_token_ids``). The recipe then recomputes the log-probs itself and weights each token by the
truncated importance ratio trainer / sampler (TIS; :func:`tis_weights`).

``--async_rollouts``: as soon as a micro-batch's rollouts are in hand, the same micro-batch of the next rollout
window is requested in the background, sampled by the policy as it is now, while the trainer trains on this one:
the trainer is then one window ahead of its sampler (staleness 1; the importance ratio covers it). Answers are
written to disk as they arrive (``<output_dir>/rollouts``, the client's cache) and a checkpoint waits for every
request in flight, so a resumed run reads back every answer it had received: it asks the server again only for what
was still unanswered when the run stopped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from minift.infer.client import APIError, ChatClient
from minift.lora.adapters import save_adapter
from minift.lora.merge import combine_adapters
from minift.train.checkpoints import checkpoints
from minift.train.sampling import Completion, SamplingParams
from minift.train.sharding import gathered

logger = logging.getLogger(__name__)
KEPT_VERSIONS = 2  # adapters kept loaded on the server: the newest, and the one an async request may still use


class RolloutServerError(RuntimeError):
    """The rollout server is gone or refused a request: what failed, and where the run can resume from."""


def tis_weights(logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"): per token ``w = min(π_trainer / π_sampler, cap)``, detached, to multiply the policy loss by.
    Returns the weights and what to log: ``sampler_mismatch`` (mean |Δ log-prob| over the completion tokens),
    ``tis_weight_std`` (the ratio's spread) and ``tis_capped`` (share of tokens whose ratio was cut at ``cap``)."""
    log_ratio = (logps.detach() - sampler_logps).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    tokens = mask.sum().clamp(min=1)
    mean = (ratio * mask).sum() / tokens
    stats = {"sampler_mismatch": log_ratio.abs().sum() / tokens,
             "tis_weight_std": (((ratio - mean) ** 2 * mask).sum() / tokens).sqrt(),
             "tis_capped": ((ratio > cap) & mask).sum() / tokens}
    return ratio.clamp(max=cap), stats


class ServerSampler:
    """``sampler(prompt_ids, params, n)`` -> completions, as :func:`~minift.train.sampling.sample` returns them,
    drawn by the server from the policy's current adapter. :meth:`at` tells it where the run stands (called by
    :class:`~minift.train.batches.OnlineBatches` before each micro-batch is made); :meth:`settle` waits for the
    requests in flight (before a checkpoint); :meth:`close` unloads the adapters and removes the files it wrote."""

    def __init__(self, cfg, weights, accelerator):
        self.cfg, self.weights, self.accelerator = cfg, weights, accelerator
        out = Path(cfg.output_dir)
        self.adapters, self.cache = out / "rollout_adapters", out / "rollouts"
        self.client = ChatClient(cfg.rollout_url, cfg.rollout_model, api_key_env="MINIFT_ROLLOUT_API_KEY",
                                 timeout=cfg.rollout_timeout, backoff=0.5, concurrency=16, cache_dir=self.cache)
        run = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]  # runs sharing a server keep apart
        self.prefix = f"minift-{run}"
        self.loaded: list[int] = []  # versions loaded on the server by this run, oldest first
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minift-rollouts")
        self.requests = ThreadPoolExecutor(max_workers=16, thread_name_prefix="minift-requests")  # one per prompt
        self.pending: dict[tuple[int, ...], Future] = {}  # an async request, by its seeds
        self.steps_done, self.window_version, self.stale_version, self.version_used = 0, 0, 0, 0
        self.upcoming = None
        self.publish_s = 0.0  # seconds writing and loading adapters, all calls

    # ---------------------------------------------------------------- where the run stands

    def at(self, window: int, steps_per_window: int, upcoming) -> None:
        """The next micro-batch is rollout window ``window``'s (each serves ``steps_per_window`` optimizer steps);
        ``upcoming()`` gives the ``(prompt_ids, params)`` of the next window's micro-batch in the same place (None
        after the last window)."""
        self.steps_done = window * steps_per_window
        self.window_version = self._version(self.steps_done)
        self.stale_version = self._version(max(0, (window - 1) * steps_per_window))
        self.upcoming = upcoming

    def _version(self, steps: int) -> int:
        return steps // self.cfg.rollout_sync_steps * self.cfg.rollout_sync_steps

    def name(self, version: int) -> str:
        return f"{self.prefix}-step{version}"

    # ---------------------------------------------------------------- sampling

    def __call__(self, prompt_ids: list[list[int]], params: list[SamplingParams], n: int) -> list[Completion]:
        key = tuple(p.seed for p in params)
        if key in self.pending:  # asked for one window ago
            completions, self.version_used = self._result(self.pending.pop(key)), self.stale_version
        elif self.cfg.async_rollouts and self.steps_done > 0 and self._all_cached(prompt_ids, params, n,
                                                                                  self.stale_version):
            completions, self.version_used = self._fetch(prompt_ids, params, n, self.stale_version), self.stale_version
        else:  # the first window, a synchronous run, or an async request lost before it was answered
            self.publish(self.window_version)
            completions = self._fetch(prompt_ids, params, n, self.window_version)
            self.version_used = self.window_version
        if self.cfg.async_rollouts and self.upcoming is not None:  # once per micro-batch (not again for a refill)
            self.publish(self.window_version)
            ids, more = self.upcoming()
            self.pending[tuple(p.seed for p in more)] = self.pool.submit(self._fetch, ids, more, n, self.window_version)
            self.upcoming = None
        return completions

    def metrics(self) -> dict[str, float]:
        """``staleness``: optimizer steps between the policy that sampled the last batch and the one training on it;
        ``adapter_sync_s``: seconds spent so far writing adapters and having the server load them."""
        return {"staleness": float(self.steps_done - self.version_used), "adapter_sync_s": self.publish_s}

    def _fetch(self, prompt_ids: list[list[int]], params: list[SamplingParams], n: int, version: int
               ) -> list[Completion]:
        futures = [self._ask(ids, p, n, version) for ids, p in zip(prompt_ids, params)]
        return [c for ids, f in zip(prompt_ids, futures) for c in _completions(ids, self._result(f), n)]

    def _ask(self, ids: list[int], p: SamplingParams, n: int, version: int) -> Future:
        return self.requests.submit(self.client.complete, ids, **self._options(p, n, version))

    def _options(self, p: SamplingParams, n: int, version: int) -> dict:
        options = {"model": self.name(version), "n": n, "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                   "top_p": p.top_p, "seed": p.seed, "logprobs": 0, "return_tokens_as_token_ids": True}
        if p.top_k:
            options["top_k"] = p.top_k
        if p.min_p:
            options["min_p"] = p.min_p
        return options

    def _all_cached(self, prompt_ids, params, n: int, version: int) -> bool:
        return all(self.client.cached(ids, **self._options(p, n, version)) is not None
                   for ids, p in zip(prompt_ids, params))

    def _result(self, future: Future):
        try:
            return future.result()
        except APIError as err:
            raise self._failure(err) from None

    def _failure(self, err: Exception) -> RolloutServerError:
        saved = checkpoints(self.cfg.output_dir)
        where = (f"the last good checkpoint is {saved[-1]}: start the server again and rerun with "
                 f"--resume_from_checkpoint auto" if saved else "no checkpoint was written yet")
        return RolloutServerError(f"rollout server: {err}; {where}")

    def settle(self) -> None:
        """Wait until every request in flight is answered and on disk (a checkpoint then covers it)."""
        for future in self.pending.values():
            self._result(future)

    # ---------------------------------------------------------------- the policy on the server

    def publish(self, version: int) -> None:
        """Make the policy as it is now available on the server as :meth:`name` (``version``); every process waits
        for it. A name this run loaded before (a resumed run's) is replaced."""
        if version in self.loaded:
            return
        start = time.perf_counter()
        folder = self.adapters / f"step{version}"
        with gathered(self.weights.model):  # under FSDP the weights are whole only inside
            if self.accelerator.is_main_process:
                try:
                    self._write(folder)
                except ValueError as err:  # a DoRA chain
                    raise RolloutServerError(f"cannot give the server the policy as one adapter: {err}") from None
        if self.accelerator.is_main_process:
            try:
                self._unload(version)  # left by an earlier, interrupted run
                self.client.post("/load_lora_adapter", {"lora_name": self.name(version),
                                                        "lora_path": str(folder.resolve())})
                for old in self.loaded[: max(0, len(self.loaded) + 1 - KEPT_VERSIONS)]:
                    self._unload(old)
                    shutil.rmtree(self.adapters / f"step{old}", ignore_errors=True)
            except APIError as err:
                raise self._failure(err) from None
        self.loaded = [*self.loaded, version][-KEPT_VERSIONS:]
        self.accelerator.wait_for_everyone()
        self.publish_s += time.perf_counter() - start

    def _write(self, folder: Path) -> None:
        w = self.weights
        if not w.parents:
            save_adapter(w.model, folder, base_model_name_or_path=w.base_model, stage="rollout policy")
            return
        trained = folder.with_name(folder.name + ".trained")
        save_adapter(w.model, trained, base_model_name_or_path=w.base_model, parents=w.parents)
        combine_adapters([*w.parents, trained], folder, stage="rollout policy")
        shutil.rmtree(trained)

    def _unload(self, version: int) -> None:
        try:
            self.client.post("/unload_lora_adapter", {"lora_name": self.name(version)})
        except APIError as err:
            if "HTTP 404" not in str(err):  # not loaded: nothing to do
                raise

    def close(self) -> None:
        """At the end of a run: nothing left loaded on the server, nor written here."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.requests.shutdown(wait=True)
        if self.accelerator.is_main_process:
            try:
                for version in self.loaded:
                    self._unload(version)
            except APIError as err:  # the run is saved; the server keeps a stale adapter or is gone
                logger.warning("could not unload the rollout adapters from the server: %s", err)
            shutil.rmtree(self.adapters, ignore_errors=True)
            shutil.rmtree(self.cache, ignore_errors=True)


def _completions(prompt_ids: list[int], answer: dict, n: int) -> list[Completion]:
    """The ``n`` choices of a completions answer (token ids, their log-probs, text, finish reason), in order."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise RolloutServerError(f"rollout server: asked for {n} completions, got {len(choices)}")
    out = []
    for choice in choices:
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") or []
        if not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            raise RolloutServerError("rollout server: the answer does not report tokens as ids; serve with minift's "
                                     "tools/serve.py or vLLM (which honour return_tokens_as_token_ids)")
        out.append(Completion(prompt_ids=list(prompt_ids), token_ids=[int(t[len("token_id:"):]) for t in tokens],
                              logprobs=[float(lp) for lp in logprobs["token_logprobs"]], text=choice["text"],
                              finish_reason=choice["finish_reason"]))
    return out
