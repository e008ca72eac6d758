"""Chain-of-thought distillation: a teacher writes step-by-step rationales, those that reach the reference answer
are kept, and the student learns them by SFT (the SFT recipe's own code).

    accelerate launch recipes/sft.py --dataset_name_or_path recipes/data/demo_reasoning.jsonl --num_train_epochs 40 --output_dir out/reasoner
    accelerate launch recipes/cot_distill.py --teacher_model_name_or_path tiny --teacher_adapter out/reasoner/adapter
    OPENAI_API_KEY=... accelerate launch recipes/cot_distill.py --teacher_api_base https://api.openai.com/v1 \\
        --teacher_model gpt-4o-mini --teacher_prompt "{prompt} Think step by step, then end with 'Answer: <answer>'."

The teacher is a local model (with adapters) or any OpenAI-compatible chat endpoint (key from the environment
variable ``teacher_api_key_env``, never logged; retries, time-outs, a call budget). It answers each prompt of
``dataset_name_or_path`` (records with an ``answer``) ``num_samples`` times; every output is appended to
``output_dir/teacher_outputs.jsonl`` as it arrives, keyed by teacher, prompt and sample index, so a rerun after a
kill repeats no generation and no call. ``answer_pattern`` (a regular expression; its first group, else the
whole match) reads the final answer: outputs without one are counted as unparsable, those with another answer
as wrong, and both are left out. The student trains on prompt -> rationale (or, with ``multitask``, the
"distilling step-by-step" form: ``[rationale] prompt`` -> rationale and ``[answer] prompt`` -> answer), then its
final-answer accuracy on held-out prompts (``answer_eval_dataset``) is measured before and after.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sft import DATA, SFTConfig
from sft import main as sft

from minift.config import ConfigError, require
from minift.data.encode import set_chat_template
from minift.data.formats import normalize_all
from minift.data.read import RecordError, load_records
from minift.infer.client import APIError, ChatClient
from minift.model.load import load_tokenizer
from minift.train.generation import final_answer
from minift.train.jsonl_cache import JsonlCache, cache_key
from minift.train.sampling import SamplingParams, row_seed, sample_chunks
from minift.train.setup import make_accelerator
from minift.train.stage import run_recipe
from minift.train.teacher import load_teacher, teacher_identity

TASKS = ("[rationale] ", "[answer] ")  # the multitask prefixes


@dataclass
class CoTConfig(SFTConfig):
    DEMO_DATA, DEMO_EVAL = DATA / "demo_reasoning.jsonl", DATA / "demo_eval.jsonl"
    RECORDS, STEPS_KNOWN = "prompt", False  # it trains on the rationales the teacher gets right
    dataset_name_or_path: str = str(DEMO_DATA)
    output_dir: str = "out/cot_distill"
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "a local teacher: model "
                                                                                   "directory, .gguf file, hub id or 'tiny'"})
    teacher_adapter: list[str] = field(default_factory=list, metadata={"help": "adapters folded into the local "
                                                                               "teacher, in order"})
    teacher_dtype: str = field(default="float32", metadata={"help": "local teacher weights dtype"})
    teacher_api_base: str | None = field(default=None, metadata={"help": "an API teacher: an OpenAI-compatible "
                                                                         "endpoint, e.g. http://127.0.0.1:8000/v1"})
    teacher_model: str | None = field(default=None, metadata={"help": "the API teacher's model name"})
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable with the key"})
    teacher_max_calls: int | None = field(default=None, metadata={"help": "API budget: calls at most (none: no limit)"})
    teacher_concurrency: int = field(default=4, metadata={"help": "API calls in flight at most"})
    teacher_timeout: float = field(default=60.0, metadata={"help": "seconds per API call before a retry"})
    teacher_max_retries: int = field(default=4, metadata={"help": "retries of a failed API call (429, 5xx, time-out), "
                                                                  "with exponential backoff"})
    teacher_prompt: str = field(default="{prompt}", metadata={"help": "what the teacher is asked; {prompt} is the "
                                                                      "record's prompt"})
    teacher_max_new_tokens: int = field(default=256, metadata={"help": "rationale tokens at most (teacher and "
                                                                      "student)"})
    teacher_temperature: float = field(default=0.0, metadata={"help": "0: greedy; num_samples > 1 needs > 0"})
    num_samples: int = field(default=1, metadata={"help": "rationales per prompt (k)"})
    answer_pattern: str = field(default=r"Answer:\s*(.+?)\s*$", metadata={
        "help": "regular expression of the final answer (group 1 if it has one), in the teacher's outputs and the "
                "student's"})
    multitask: bool = field(default=False, metadata={"help": "distilling step-by-step: rationale and answer as two "
                                                             "targets with task prefixes"})
    num_train_epochs: float = 10.0

    def check(self) -> None:
        local, api = bool(self.teacher_model_name_or_path), bool(self.teacher_api_base)
        checks = [(local != api, "give one teacher: --teacher_model_name_or_path (local) or --teacher_api_base with "
                                 "--teacher_model (an OpenAI-compatible endpoint)"),
                  (not api or bool(self.teacher_model), "teacher_api_base needs teacher_model"),
                  ("{prompt}" in self.teacher_prompt, "teacher_prompt must contain {prompt}"),
                  (self.num_samples >= 1 and self.teacher_max_new_tokens >= 1,
                   "num_samples and teacher_max_new_tokens must be >= 1"),
                  (self.num_samples == 1 or self.teacher_temperature > 0,
                   "num_samples > 1 needs teacher_temperature > 0: greedy answers would all be the same"),
                  (self.teacher_concurrency >= 1 and self.teacher_timeout > 0 and self.teacher_max_retries >= 0,
                   "teacher_concurrency must be >= 1, teacher_timeout > 0 and teacher_max_retries >= 0")]
        require(checks)


def reasoning_prompts(path: str, skip_invalid: bool) -> list[dict]:
    """``{"prompt": text, "answer": reference}`` of each record; one without an answer names its file:line."""
    out = []
    for ex in normalize_all(load_records(path), "prompt", skip_invalid=skip_invalid).examples:
        if "answer" not in ex.extra or not str(ex.extra["answer"]).strip():
            raise RecordError(f"{ex.source}: no 'answer' field: CoT distillation keeps the rationales that reach it")
        if len(ex.messages) != 1 or ex.messages[0]["role"] != "user":
            raise RecordError(f"{ex.source}: the prompt must be one user turn")
        out.append({"prompt": ex.messages[0]["content"], "answer": str(ex.extra["answer"]).strip()})
    return out


def teacher_outputs(cfg: CoTConfig, accelerator, prompts: list[dict]) -> tuple[list[list[str]], dict]:
    """``num_samples`` outputs of the teacher per prompt, through the JSONL cache (each process a share of what is
    missing); returns them and the calls made / served from the cache."""
    cache = JsonlCache(Path(cfg.output_dir) / "teacher_outputs.jsonl", accelerator.process_index)
    options = {"temperature": cfg.teacher_temperature, "max_tokens": cfg.teacher_max_new_tokens}
    who = ([cfg.teacher_api_base, cfg.teacher_model] if cfg.teacher_api_base
           else [teacher_identity(cfg.teacher_model_name_or_path, cfg.teacher_adapter, cfg.teacher_dtype)])
    jobs = [(i, j, cfg.teacher_prompt.format(prompt=p["prompt"])) for i, p in enumerate(prompts)
            for j in range(cfg.num_samples)]
    keys = [cache_key(who, options, asked, j) for _, j, asked in jobs]

    def ask_api(todo: list[int], add) -> None:
        client = ChatClient(cfg.teacher_api_base, cfg.teacher_model, api_key_env=cfg.teacher_api_key_env,
                            timeout=cfg.teacher_timeout, max_retries=cfg.teacher_max_retries,
                            concurrency=cfg.teacher_concurrency, max_calls=cfg.teacher_max_calls)
        requests = [([{"role": "user", "content": jobs[k][2]}], {**options, "seed": jobs[k][1]}) for k in todo]
        client.chat_many(requests, on_answer=lambda n, answer: add(todo[n], answer["choices"][0]["message"]["content"]))

    def ask_local(todo: list[int], add) -> None:
        tokenizer = load_tokenizer(cfg.teacher_model_name_or_path)
        teacher = load_teacher(cfg.teacher_model_name_or_path, tokenizer, adapters=cfg.teacher_adapter,
                               dtype=cfg.teacher_dtype).to(accelerator.device)
        set_chat_template(tokenizer, cfg.chat_template)
        params = [SamplingParams(max_new_tokens=cfg.teacher_max_new_tokens, temperature=cfg.teacher_temperature,
                                 seed=row_seed(cfg.seed, jobs[k][0], jobs[k][1])) for k in todo]
        for n, c in sample_chunks(teacher, tokenizer, [render(tokenizer, jobs[k][2]) for k in todo], params):
            add(todo[n], c.text)

    made = cache.fill(keys, accelerator, ask_api if cfg.teacher_api_base else ask_local, "teacher rationales")
    outputs = [[] for _ in prompts]
    for (i, _, _), key in zip(jobs, keys):
        outputs[i].append(cache[key])
    return outputs, {"teacher_calls": made, "teacher_cached": len(jobs) - made}


def keep_correct(cfg: CoTConfig, prompts: list[dict], outputs: list[list[str]]) -> tuple[list[dict], dict]:
    """SFT records from the outputs whose final answer equals the reference; counts of kept, wrong, unparsable."""
    records, counts = [], {"kept": 0, "wrong": 0, "unparsable": 0}
    for p, texts in zip(prompts, outputs):
        for text in texts:
            got = final_answer(text, cfg.answer_pattern)
            verdict = "unparsable" if got is None else "kept" if got == p["answer"] else "wrong"
            counts[verdict] += 1
            if verdict != "kept":
                continue
            if cfg.multitask:
                records += [{"prompt": TASKS[0] + p["prompt"], "completion": text.strip()},
                            {"prompt": TASKS[1] + p["prompt"], "completion": p["answer"]}]
            else:
                records.append({"prompt": p["prompt"], "completion": text.strip()})
    total = sum(counts.values())
    return records, {**counts, "teacher_accuracy": counts["kept"] / total if total else 0.0}


def render(tokenizer, text: str) -> list[int]:
    """A one-turn user prompt through the chat template, as SFT trains prompt / completion records."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True,
                                         return_dict=False)


def main(cfg: CoTConfig) -> dict:
    accelerator = make_accelerator(cfg)
    if not cfg.answer_eval_dataset:
        raise ConfigError("answer_eval_dataset is required: pass --answer_eval_dataset FILE, prompts with answers held "
                          "out from dataset_name_or_path, on which the student's final answers are measured")
    prompts = reasoning_prompts(cfg.dataset_name_or_path, cfg.skip_invalid)  # data errors before any model loads
    held_out = reasoning_prompts(cfg.answer_eval_dataset, False)
    outputs, calls = teacher_outputs(cfg, accelerator, prompts)
    records, counts = keep_correct(cfg, prompts, outputs)
    report = {**counts, **calls}
    if not records:
        raise ConfigError(f"no teacher output reached its reference answer ({counts}); check answer_pattern and "
                          f"teacher_prompt against {Path(cfg.output_dir) / 'teacher_outputs.jsonl'}")
    out = Path(cfg.output_dir)
    # the SFT stage measures the final answers before and after; with multitask it asks for them directly
    answer_eval = out / "answer_eval.jsonl" if cfg.multitask else Path(cfg.answer_eval_dataset)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "rationales.jsonl", records)
        if cfg.multitask:
            write_jsonl(answer_eval, [{"prompt": TASKS[1] + p["prompt"], "answer": p["answer"]} for p in held_out])
    accelerator.wait_for_everyone()
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    result = sft(SFTConfig(**{**{k: v for k, v in vars(cfg).items() if k in sft_fields},
                              "dataset_name_or_path": str(out / "rationales.jsonl"),
                              "answer_eval_dataset": str(answer_eval), "max_new_tokens": cfg.teacher_max_new_tokens,
                              "answer_pattern": None if cfg.multitask else cfg.answer_pattern}))
    if accelerator.is_main_process:
        report.update(final_answer_accuracy_before=result.pop("answer_accuracy_before"),
                      final_answer_accuracy=result.pop("answer_accuracy"))
        print("\n".join([f"teacher: {counts['kept']} rationales kept, {counts['wrong']} wrong, {counts['unparsable']} "
                         f"unparsable ({100 * counts['teacher_accuracy']:.0f}% right); {calls['teacher_calls']} "
                         f"generated, {calls['teacher_cached']} from the cache",
                         f"student final-answer accuracy on held-out prompts: "
                         f"{100 * report['final_answer_accuracy_before']:.0f}% -> "
                         f"{100 * report['final_answer_accuracy']:.0f}%"]))
        (out / "cot_distill.json").write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    return {**result, **report}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    run_recipe(main, CoTConfig, __doc__, errors=(APIError,))
