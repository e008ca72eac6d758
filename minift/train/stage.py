"""The stage: everything around a recipe's own training step, one call each.

    stage = Stage(cfg, "sft")                      # Accelerator, output dir lock and check, logging
    tokenizer = stage.load_tokenizer()             # data is read and checked with it before weights load
    batches = stage.fixed_batches(rows, collate)   # or stage.online_batches(prompts, make_batch)
    model = stage.load_model()                     # base + frozen init adapter + trainable adapter
    wrapper = stage.prepare(CausalLMLoss(model), batches, evaluate=...)   # optimizer, schedule
    if stage.resume() == 0:                        # checkpoint, RNG and data position, when resuming
        stage.state["before"].update(...)          # more metrics before training (kept in checkpoints)
    for window in stage.steps():                   # the micro-batches of each optimizer step
        ...forward, loss, backward: the recipe's own...
        stage.update(loss, {"loss": loss}, units=n_tokens)   # health checks, clip, step, log, eval, checkpoint
    stage.finish(data=report)                      # adapter / model, merge, card, hub, plot, run.json, summary

Everything here works the same with one process or many (``accelerate launch``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from minift.config import ConfigError, parse_config, run_settings
from minift.constants import DEFAULT_ADAPTER
from minift.data.encode import set_chat_template
from minift.data.read import RecordError
from minift.lora.merge import merge_and_save
from minift.model.load import load_tokenizer
from minift.sections import TrainConfig
from minift.train.batches import (
    OnlineBatches,
    ShardedBatches,
    check_enough_rows,
    total_steps,
)
from minift.train.checkpoints import (
    CHECKPOINT,
    CheckpointError,
    Weights,
    check_same_run,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minift.train.dry_run import recipe_dry_run
from minift.train.generation import answer_eval_examples, answer_metrics
from minift.train.health import Health
from minift.train.lock import release_output_dirs, take_output_dir
from minift.train.outputs import (
    HubPushError,
    MetricsLog,
    Throughput,
    plot_losses,
    push_to_hub,
    start_trackers,
    write_model_card,
    write_run_json,
)
from minift.train.remote import RolloutServerError, ServerSampler
from minift.train.rewards import RewardError
from minift.train.setup import (
    close_processes,
    end_stage,
    load_for_training,
    make_accelerator,
    make_optimizer,
    make_scheduler,
)
from minift.train.sharding import gathered, needs_own_sharding, register, shard
from minift.train.zero import prepare_engine, uses_deepspeed
from minift.train.zero import step as deepspeed_step

logger = logging.getLogger(__name__)
RUN_OUTPUTS = ("metrics.jsonl", "run.json", "loss.png", "adapter", "model", "merged")


def check_output_dir(cfg: TrainConfig, is_main: bool) -> None:
    """Refuse to train into a directory holding an earlier run unless resuming it or told to overwrite it
    (then its checkpoints and logs are deleted; other files, such as cached reference log-probs, stay)."""
    out = Path(cfg.output_dir)
    earlier = sorted(p.name for p in out.glob("*") if p.name in RUN_OUTPUTS or CHECKPOINT.fullmatch(p.name)
                     or p.name.startswith(".checkpoint-")) if out.is_dir() else []  # not a user's checkpoint-notes/
    if not earlier or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir {out} holds an earlier run ({', '.join(earlier[:4])}); pass "
                          f"--resume_from_checkpoint auto to continue it, --overwrite_output_dir true to replace "
                          f"it, or another --output_dir")
    if is_main:
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info("overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(earlier), out)


class Stage:
    """One training stage: set-up, the optimizer loop's bookkeeping, and the finish. See the module doc."""

    def __init__(self, cfg: TrainConfig, name: str, *, unit: str = "tokens"):
        self.cfg, self.name, self.unit, self.started = cfg, name, unit, time.time()
        self.accelerator = make_accelerator(cfg)
        logging.basicConfig(level=logging.INFO if self.accelerator.is_main_process else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        self.lock = take_output_dir(self.accelerator, cfg.output_dir)  # one run per output dir, till finish
        if cfg.real_model_note():
            logger.info(cfg.real_model_note())
        check_output_dir(cfg, self.accelerator.is_main_process)
        self.accelerator.wait_for_everyone()
        self.out = Path(cfg.output_dir)
        # Kept in every checkpoint; ``settings`` are what a resume must not change (see check_same_run).
        settings = {**run_settings(cfg), "processes": self.accelerator.num_processes,
                    "mixed_precision": self.accelerator.mixed_precision}
        self.state = {"step": 0, "best_eval_loss": None, "best_checkpoint": None, "bad_evals": 0, "before": {},
                      "settings": settings, "healthy": True, "warnings": []}
        self.checkpoint = self._find_checkpoint() if cfg.resume_from_checkpoint else None
        self.tokenizer = self.model = self.weights = None
        self.last_record: dict = {}
        self.eval_result: dict = {}
        self._stop = False

    # ------------------------------------------------------------------ set-up

    def _find_checkpoint(self) -> Path | None:
        """The checkpoint to resume (checked intact and of this run), before anything loads."""
        if self.accelerator.is_main_process:
            for leftover in self.out.glob(".checkpoint-*"):  # temp dirs of saves a kill interrupted
                shutil.rmtree(leftover, ignore_errors=True)
                logger.info("removed %s, left by an interrupted checkpoint save", leftover)
        self.accelerator.wait_for_everyone()
        checkpoint = find_checkpoint(self.cfg.output_dir, self.cfg.resume_from_checkpoint)
        if checkpoint:
            check_same_run(checkpoint, self.state["settings"])
        return checkpoint

    def load_tokenizer(self):
        """The base model's tokenizer (and the config's chat template, if it names one). No weights load."""
        self.tokenizer = load_tokenizer(self.cfg.model_name_or_path)
        set_chat_template(self.tokenizer, getattr(self.cfg, "chat_template", None))
        # A recipe with a data section may name prompts with reference answers: greedy exact match on them
        # is measured before training (kept in checkpoints) and after.
        self.answer_examples = answer_eval_examples(getattr(self.cfg, "answer_eval_dataset", None), self.tokenizer,
                                                    max_prompt_length=getattr(self.cfg, "max_seq_length", 0))
        return self.tokenizer

    def answer_metrics(self, model=None, *, suffix: str = "") -> dict:
        """Greedy exact match of ``model`` (default: the one trained) on the configured answer eval set (``{}``
        when there is none)."""
        return answer_metrics(self.model if model is None else model, self.tokenizer, self.answer_examples,
                              max_new_tokens=getattr(self.cfg, "max_new_tokens", 16),
                              answer_pattern=getattr(self.cfg, "answer_pattern", None), suffix=suffix)

    def load_model(self, task: str = "causal_lm"):
        """Base model, the frozen init adapter (if any), and the trainable adapter (or every weight); ``task``
        ``seq_cls``: with a reward model's scalar head (see :func:`~minift.train.setup.load_for_training`)."""
        self.model = load_for_training(self.cfg, self.tokenizer, task)
        parents = [self.cfg.init_adapter] if self.cfg.init_adapter else []
        self.weights = Weights(self.model, full=self.cfg.lora_r == 0, base_model=self.cfg.model_name_or_path,
                               parents=parents)
        return self.model

    def fixed_batches(self, rows: list, collate, *, what: str = "rows") -> ShardedBatches:
        """This process's deterministic micro-batches of ``rows`` (see :class:`~minift.train.batches.ShardedBatches`).
        Called before :meth:`load_model`, too few rows for one global batch fail before any weights load."""
        check_enough_rows(len(rows), self.cfg, self.accelerator.num_processes, what)
        return ShardedBatches(rows, self.cfg.per_device_train_batch_size, self.accelerator.num_processes,
                              self.accelerator.process_index, self.cfg.seed, collate)

    def online_batches(self, prompts: list, make_batch, *, what: str = "prompts") -> OnlineBatches:
        """Micro-batches made during training from ``prompts`` (see :class:`~minift.train.batches.OnlineBatches`):
        ``cfg.batch_plan()`` says how many prompts each holds and for how many optimizer steps a window serves. With
        ``--rollout_backend server`` the maker's ``rollouts`` get their server sampler here (after the model loads)."""
        per_device, repeats = self.cfg.batch_plan()
        check_enough_rows(len(prompts), self.cfg, self.accelerator.num_processes, what, per_device)
        rollouts = getattr(make_batch, "rollouts", None)
        if rollouts is not None and getattr(self.cfg, "rollout_backend", "local") == "server":
            rollouts.server = ServerSampler(self.cfg, self.weights, self.accelerator)  # minift.train.remote
        return OnlineBatches(prompts, per_device, self.accelerator.num_processes, self.accelerator.process_index,
                             self.cfg.seed, make_batch, accumulation=self.cfg.gradient_accumulation_steps,
                             repeats=repeats, follow=rollouts.at if rollouts is not None else None)

    @property
    def adapter_name(self) -> str | None:
        """The trainable adapter's name; None for a full fine-tune."""
        return None if self.weights.full else DEFAULT_ADAPTER

    def prepare(self, wrapper, batches, *, evaluate=None):
        """Optimizer and schedule for the trainable weights; ``wrapper`` (the module whose forward DDP watches)
        prepared for the launcher. ``batches``: anything with ``per_epoch`` and ``micro_batch(index)``
        (:class:`~minift.train.batches.ShardedBatches`, :class:`~minift.train.batches.OnlineBatches`). ``evaluate(wrapper)``
        returns metrics with ``eval_loss``; it runs every ``eval_steps`` and at the end."""
        cfg = self.cfg
        if self.checkpoint:  # into whole tensors, before any sharding
            self.weights.load(self.checkpoint)
        if needs_own_sharding(self.accelerator):
            shard(self.model, wrapper, mixed_precision=self.accelerator.mixed_precision)
            self.wrapper, self.optimizer = wrapper, self.accelerator.prepare(make_optimizer(cfg, self.model))
        elif uses_deepspeed(self.accelerator):  # with minift's batch, accumulation and clipping
            self.wrapper, self.optimizer = prepare_engine(self.accelerator, cfg, self.model, wrapper,
                                                          make_optimizer(cfg, self.model))
        else:
            self.wrapper, self.optimizer = self.accelerator.prepare(wrapper, make_optimizer(cfg, self.model))
            if self.accelerator.is_fsdp2:  # GPUs: Accelerate sharded it (untested here: no GPU)
                register(self.model, self.wrapper)
        self.batches, self.evaluate = batches, evaluate
        self.total = total_steps(cfg, batches.per_epoch)
        if isinstance(batches, OnlineBatches):
            batches.total_steps = self.total
        self.scheduler = make_scheduler(cfg, self.optimizer, self.total)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        return self.wrapper

    def resume(self) -> int:
        """Restore the newest (or the given) checkpoint when ``resume_from_checkpoint`` is set; start the
        metrics log and trackers. Returns the step training continues from (0: a fresh run)."""
        cfg, checkpoint = self.cfg, self.checkpoint
        if checkpoint:
            self.state = {"before": {}, "warnings": [],
                          **load_checkpoint(checkpoint, self.accelerator, self.model, self.optimizer, self.scheduler)}
            logger.info("resumed from %s at step %d", checkpoint, self.state["step"])
        else:
            with self.gathered():
                if self.accelerator.is_main_process:
                    self.state["before"].update(self.answer_metrics(suffix="_before"))
        self.metrics = MetricsLog(self.accelerator, cfg.output_dir, resume_step=self.state["step"])
        if cfg.report_to != "none":
            start_trackers(self.accelerator, cfg, f"minift-{self.name}")
        return self.state["step"]

    # ------------------------------------------------------------------ the loop

    @property
    def rollouts(self):
        """An online recipe's :class:`~minift.train.rollouts.Rollouts` (its batch maker's), else None."""
        batches = getattr(self, "batches", None)
        return getattr(batches.make_batch, "rollouts", None) if isinstance(batches, OnlineBatches) else None

    @property
    def rows_per_step(self) -> int:
        """Rows (examples, pairs, prompts or completions) per optimizer step over all processes."""
        cfg = self.cfg
        return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes

    def steps(self):
        """Yield each remaining optimizer step's window: its ``gradient_accumulation_steps`` micro-batches,
        on the device. The recipe calls :meth:`update` once per window; early stopping ends the loop."""
        accum, device = self.cfg.gradient_accumulation_steps, self.accelerator.device
        self.bar = tqdm(total=self.total, initial=self.state["step"], desc=self.name,
                        disable=not self.accelerator.is_main_process)
        self.speed = Throughput()
        self.health = Health(self.accelerator, self.cfg.output_dir, self.params, self.state["warnings"])
        self.wrapper.train()
        self.clock = time.perf_counter()  # where the time of the step that generate_share divides starts
        self.sampled = 0.0  # the rollouts' sampling seconds already counted in a generate_share
        for step in range(self.state["step"] + 1, self.total + 1):
            window = [{k: v.to(device) for k, v in self.batches.micro_batch(m).items()}
                      for m in range((step - 1) * accum, step * accum)]
            yield window
            if self.state["step"] != step:
                raise RuntimeError(f"step {step}: call stage.update(...) once per window of stage.steps()")
            if self._stop:
                break
        self.bar.close()

    def update(self, loss: float, record: dict, *, units: float) -> None:
        """After the recipe's backward: check the loss, clip, step the optimizer and schedule, log
        ``record`` (plus lr, ``<unit>_per_s``, epoch, grad_norm, and for batches made with :class:`Rollouts`
        (the maker's ``rollouts``), ``generate_share``), evaluate, checkpoint, early stopping."""
        cfg, state = self.cfg, self.state
        step = state["step"] + 1
        rollouts = self.rollouts
        if rollouts is not None:  # an online recipe: the share of the step spent sampling
            now = time.perf_counter()
            record["generate_share"] = (rollouts.sampling_s - self.sampled) / (now - self.clock)
            self.clock, self.sampled = now, rollouts.sampling_s
        self.health.check_loss(loss, step)
        if uses_deepspeed(self.accelerator):  # the engine reduces, clips and steps in one call
            grad_norm = deepspeed_step(self.accelerator)
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        if hasattr(grad_norm, "full_tensor"):  # a sharded model's
            grad_norm = grad_norm.full_tensor()
        self.health.check_gradient(grad_norm, step)
        self.optimizer.step()  # under DeepSpeed a no-op (stepped above)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"], self.last_record = step, record
        self.speed.add(units)
        self.bar.update(1)
        healthy = None  # the weights are checked where they are logged or saved, once a step
        if cfg.logging_steps and (step % cfg.logging_steps == 0 or step == self.total):
            healthy = state["healthy"] = self.health.check_weights(step)
            logged = {**record, "lr": self.scheduler.get_last_lr()[0], f"{self.unit}_per_s": self.speed.rate(),
                      "epoch": step * cfg.gradient_accumulation_steps / self.batches.per_epoch}
            if grad_norm is not None:
                logged["grad_norm"] = float(grad_norm)
            self.metrics.log(logged, step)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{logged['lr']:.2e}")
        improved = False
        if self.evaluate and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == self.total):
            with self.gathered():
                self.eval_result = self.evaluate(self.wrapper)
            self.metrics.log(self.eval_result, step)
            best = state["best_eval_loss"]
            improved = best is None or self.eval_result["eval_loss"] < best
            state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
            if improved:
                state["best_eval_loss"] = self.eval_result["eval_loss"]
        self._stop = bool(cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience)
        if cfg.save_steps and (step % cfg.save_steps == 0 or improved or self._stop):
            if improved:
                state["best_checkpoint"] = str(self.out / f"checkpoint-{step}")
            # a diverged checkpoint is never "the last good one"
            state["healthy"] = self.health.check_weights(step) if healthy is None else healthy
            if rollouts is not None and rollouts.server is not None:
                rollouts.server.settle()  # the rollouts in flight are on disk before the checkpoint that needs them
            save_checkpoint(self.accelerator, self.out, self.weights, self.optimizer, self.scheduler, state,
                            save_total_limit=cfg.save_total_limit)
        if self._stop:
            logger.info("early stopping at step %d: no eval improvement in %d evaluations", step, state["bad_evals"])

    # ------------------------------------------------------------------ the end

    def finish(self, *, data: dict | None = None, after=None) -> dict:
        """Save the adapter (or model, with its tokenizer), measure exact match, then ``after(result)`` (the
        recipe's own final metrics, main process), merge, model card, hub push, loss plot, ``run.json`` (with
        ``data``, the recipe's data report) and a summary. Returns the result: step, train and eval metrics,
        the metrics before training and after."""
        cfg = self.cfg
        result = {"step": self.state["step"], "train_loss": self.last_record.get("loss"), **self.eval_result,
                  **self.state["before"]}
        with self.gathered():  # the weights whole where they are saved and measured
            if self.accelerator.is_main_process:
                saved = self.weights.save(self.out)
                if self.weights.full:  # a full fine-tune is a whole model directory: keep its tokenizer with it
                    self.tokenizer.save_pretrained(saved)
                result.update(self.answer_metrics())
                if after:
                    result.update(after(result))
        if self.accelerator.is_main_process:
            chain = self.weights.parents
            merged = merge_and_save(cfg.model_name_or_path, chain + [str(saved)], self.out / "merged") \
                if cfg.merge_output and not self.weights.full else None
            write_model_card(saved, cfg, self.name, result)
            if merged:
                write_model_card(merged, cfg, self.name, result)
            plot = plot_losses(self.metrics.history, self.out / "loss.png")
            seconds = round(time.time() - self.started, 2)
            record = dict(stage=self.name, adapter=str(saved), parents=chain, merged=merged, hub_url=None,
                          loss_plot=plot, metrics=result, data=data or {}, warnings=self.state["warnings"],
                          best_checkpoint=self.state["best_checkpoint"], seconds=seconds)
            run = write_run_json(cfg, cfg.output_dir, **record)  # everything is on disk before any upload
            logger.info("%s", self.summary(result, saved, merged, run, seconds))
            if cfg.push_to_hub:
                record["hub_url"] = push_to_hub(saved if cfg.push_adapter_only or merged is None else merged,
                                                cfg.hub_repo_id, private=cfg.hub_private,
                                                message=cfg.hub_commit_message)
                write_run_json(cfg, cfg.output_dir, **record)
            self.lock.release()
        if self.rollouts is not None and self.rollouts.server is not None:
            self.rollouts.server.close()
        end_stage(self.accelerator)
        return result

    def gathered(self):
        """A block where the trained model is whole on every process (see :func:`~minift.train.sharding.gathered`;
        nothing happens unless FSDP shards it). Every process must enter it."""
        return gathered(self.model)

    def summary(self, result: dict, saved: Path, merged, run: Path, seconds: float) -> str:
        shown = {k: v for k, v in result.items() if isinstance(v, float) and (
            k in ("train_loss", "eval_loss", "eval_ranking") or "accura" in k or "greedy" in k)}
        lines = [f"{self.name} done: {result['step']} steps in {seconds:.0f} s"]
        lines += [f"  {k}: {v:.4f}" for k, v in shown.items()]
        lines.append(f"  {'model' if self.weights.full else 'adapter'}: {saved}")
        if merged:
            lines.append(f"  merged model: {merged}")
        lines.append(f"  run record: {run}")
        lines += [f"  warning: {w}" for w in self.state["warnings"]]
        return "\n".join(lines)


def run_recipe(main, config_class, doc: str, errors: tuple[type[Exception], ...] = (), parse=None) -> None:
    """A recipe script's ``__main__``: config from flags and YAML (or ``parse()``, a script with flags of its own),
    ``main(config)`` (with ``--dry_run``: the checks of :mod:`minift.train.dry_run` instead), and any config or
    data mistake (or one of the recipe's own ``errors``, such as an API that keeps failing) printed as one
    ``error:`` line (exit status 1) instead of a traceback."""
    finished = False
    try:
        if parse:
            main(parse())
        else:
            argv = sys.argv[1:]
            config = parse_config(config_class, [a for a in argv if a != "--dry_run"], doc.split("\n\n")[0])
            if "--dry_run" in argv:
                print(recipe_dry_run(config, Path(sys.argv[0]).stem))
            else:
                main(config)
        finished = True
    except (ConfigError, FileNotFoundError, RecordError, RewardError, HubPushError, FloatingPointError, CheckpointError,
            RolloutServerError, *errors) as err:
        sys.exit(f"error: {err}")
    finally:
        release_output_dirs()
        close_processes(finished)
