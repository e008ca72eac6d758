"""Write the bundled demo datasets in recipes/data/ (deterministic: same seed, byte-identical files).

Usage (from anywhere; paths are resolved from this file):

    python tools/make_demo_data.py

The task is "reverse a short list of 2-4 distinct words", e.g. the prompt
``Reverse the words: cat dog red`` has the answer ``red dog cat``. The words are line 4 of
minift/model/tiny_corpus.txt (the tiny model's tokenizer corpus). Files written:

- demo_sft.jsonl        5000 SFT records, round-robin over alpaca (output / response / no input),
                         prompt/completion, question/answer, messages (plain, with a system turn,
                         two-exchange multi-turn) and ShareGPT conversations.
- demo_eval.jsonl        100 held-out {"prompt", "answer"} records (equal mix of 2, 3, 4 words); no
                         eval word set (order ignored) occurs in any training file.
- demo_preference.jsonl 2000 {"prompt", "chosen", "rejected"} pairs; half plain strings, a quarter
                         as message lists, a quarter with an implicit (shared user turn) prompt.
- demo_kto.jsonl        2000 unpaired {"prompt", "completion", "label"} records, half correct.
- demo_prompts.jsonl     4000 {"prompt", "answer"} records for online RL (answer goes to rewards; enough that
                         a run does not memorize them).
- demo_judge.jsonl      4000 {"prompt", "completion"} records that teach a judge: minift.train.judges' pairwise
                         question about a right and a wrong reversal (2000 pairs, both orders), answered A or B.
- demo_eval_pairs.jsonl  100 held-out {"prompt", "chosen", "rejected"} pairs on the eval lists (a right and a
                         wrong reversal): what a judge or a reward model is scored on.
- demo_reasoning.jsonl  2000 {"prompt", "completion", "answer"} records whose completion works
                         the reversal out step by step, then ends with "Answer: ...".

All training files draw from one pool of word lists, disjoint (as sets of words) from the eval lists.
Rejected / wrong answers are subtly wrong: two adjacent words swapped, the original (unreversed)
order, one word dropped, the last word repeated, or one word replaced by another vocabulary word; never
the correct answer (dropped and repeated words are equally common, so length does not tell a wrong answer).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "minift" / "model" / "tiny_corpus.txt"
OUT_DIR = ROOT / "recipes" / "data"
SYSTEM = "You are a helpful assistant."
N_EVAL, N_POOL = 100, 12000


def load_vocab() -> list[str]:
    words = CORPUS.read_text(encoding="utf-8").splitlines()[3].split()  # line 4 of the corpus
    assert len(words) == len(set(words)) >= 10, "line 4 of tiny_corpus.txt should be the word list"
    return words


def make_lists(rng: random.Random, vocab: list[str]) -> tuple[list[tuple], list[tuple]]:
    """(eval lists, training pool): eval has an equal mix of 2, 3, 4 words; no word set in both."""
    eval_lists: list[tuple] = []
    eval_sets: set[frozenset] = set()
    for i in range(N_EVAL):
        k = 2 + i % 3
        while True:
            words = tuple(rng.sample(vocab, k))
            if frozenset(words) not in eval_sets:
                break
        eval_lists.append(words)
        eval_sets.add(frozenset(words))
    rng.shuffle(eval_lists)
    pool: set[tuple] = set()
    ordered_pool: list[tuple] = []
    while len(ordered_pool) < N_POOL:
        words = tuple(rng.sample(vocab, rng.randint(2, 4)))
        if words not in pool and frozenset(words) not in eval_sets:
            pool.add(words)
            ordered_pool.append(words)
    return eval_lists, ordered_pool


def prompt(words) -> str:
    return "Reverse the words: " + " ".join(words)


def answer(words) -> str:
    return " ".join(reversed(words))


def wrong_answer(rng: random.Random, words, vocab: list[str]) -> str:
    """A subtly wrong reversal of ``words`` (never equal to the correct one)."""
    right = list(reversed(words))
    # "drop" answers are shorter and "repeat" ones (the last word again: stopping too late) longer, equally
    # often, so that length does not tell a wrong answer: with drops alone, DPO learned "longer is better"
    # and its greedy answers repeated their last word.
    kind = rng.choice(["swap", "original", "drop", "repeat", "replace"])
    if kind == "swap":
        i = rng.randrange(len(right) - 1)
        wrong = right[:i] + [right[i + 1], right[i]] + right[i + 2 :]
    elif kind == "original":
        wrong = list(words)
    elif kind == "drop":
        wrong = right[:]
        del wrong[rng.randrange(len(wrong))]
    elif kind == "repeat":
        wrong = right + right[-1:]
    else:
        wrong = right[:]
        wrong[rng.randrange(len(wrong))] = rng.choice([w for w in vocab if w not in words])
    assert wrong != right
    return " ".join(wrong)


def reasoning(words) -> str:
    steps = [f"The words are {', '.join(words)}.", f"The last word is {words[-1]}."]
    steps += [f"The word before it is {w}." for w in reversed(words[:-1])]
    return " ".join(steps) + f" Answer: {answer(words)}"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sft_record(fmt: str, words, extra) -> dict:
    p, a, joined = prompt(words), answer(words), " ".join(words)
    if fmt == "alpaca":
        return {"instruction": "Reverse the words.", "input": joined, "output": a}
    if fmt == "alpaca_response":
        return {"instruction": "Reverse the words.", "input": joined, "response": a}
    if fmt == "alpaca_no_input":
        return {"instruction": p, "output": a}
    if fmt == "prompt_completion":
        return {"prompt": p, "completion": a}
    if fmt == "question_answer":
        return {"question": p, "answer": a}
    if fmt == "messages":
        return {"messages": [user(p), assistant(a)]}
    if fmt == "messages_system":
        return {"messages": [{"role": "system", "content": SYSTEM}, user(p), assistant(a)]}
    if fmt == "messages_multiturn":
        return {"messages": [user(p), assistant(a), user(prompt(extra)), assistant(answer(extra))]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
    raise ValueError(fmt)


SFT_FORMATS = [
    "alpaca", "alpaca_response", "alpaca_no_input", "prompt_completion", "question_answer",
    "messages", "messages_system", "messages_multiturn", "sharegpt",
]  # fmt: skip


def make_sft(rng: random.Random, pool: list[tuple], n: int = 5000) -> list[dict]:
    lists = rng.sample(pool, 2 * n)  # the second half feeds the multi-turn records' second exchange
    return [sft_record(SFT_FORMATS[i % len(SFT_FORMATS)], lists[i], lists[n + i]) for i in range(n)]


def make_preference(rng: random.Random, pool, vocab, n: int = 2000) -> list[dict]:
    # 2000, not 400: DPO on 360 training pairs overfits the tiny model (held-out implicit-reward
    # accuracy 82-90% depending on the split); on 1800 it reaches 94-96%.
    records = []
    for i, words in enumerate(rng.sample(pool, n)):
        p, chosen, rejected = prompt(words), answer(words), wrong_answer(rng, words, vocab)
        if i % 4 == 2:  # explicit prompt, conversational
            records.append({"prompt": [user(p)], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]})
        elif i % 4 == 3:  # implicit prompt: the shared user turn is part of both conversations
            records.append({"chosen": [user(p), assistant(chosen)], "rejected": [user(p), assistant(rejected)]})
        else:
            records.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return records


def make_kto(rng: random.Random, pool, vocab, n: int = 2000) -> list[dict]:
    # 2000, not 400: from the SFT demo adapter, 360 training answers ranked 81.5-89% of held-out pairs right
    # depending on the CPU; 1,800 rank 88-90% (three seeds).
    records = []
    for i, words in enumerate(rng.sample(pool, n)):
        good = i % 2 == 0
        completion = answer(words) if good else wrong_answer(rng, words, vocab)
        records.append({"prompt": prompt(words), "completion": completion, "label": good})
    return records


def make_judge(rng: random.Random, pool, vocab, n: int = 2000) -> list[dict]:
    """SFT records that teach a judge (``minift.train.judges.LocalJudge``): its pairwise question about a right and
    a wrong reversal, answered with the letter of the right one; each pair asked in both orders."""
    from minift.train.judges import PAIRWISE, RUBRIC

    records = []
    for words in rng.sample(pool, n):
        right, wrong = answer(words), wrong_answer(rng, words, vocab)
        for first, second, letter in ((right, wrong, "A"), (wrong, right, "B")):
            question = PAIRWISE.format(rubric=RUBRIC, prompt=prompt(words), first=first, second=second)
            records.append({"prompt": question, "completion": letter})
    return records


def write_jsonl(name: str, records: list[dict]) -> None:
    path = OUT_DIR / name
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records):4d} records to {path.relative_to(ROOT)}")


def main() -> None:
    vocab = load_vocab()
    # One generator per purpose, so changing one file leaves the others byte-identical.
    eval_lists, pool = make_lists(random.Random(SEED), vocab)
    rngs = {name: random.Random(SEED + i)
            for i, name in enumerate(["sft", "pref", "kto", "rl", "reason", "judge", "eval_pairs"], 1)}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl("demo_sft.jsonl", make_sft(rngs["sft"], pool))
    write_jsonl("demo_eval.jsonl", [{"prompt": prompt(w), "answer": answer(w)} for w in eval_lists])
    write_jsonl("demo_preference.jsonl", make_preference(rngs["pref"], pool, vocab))
    write_jsonl("demo_kto.jsonl", make_kto(rngs["kto"], pool, vocab))
    rl_lists = rngs["rl"].sample(pool, 4000)
    write_jsonl("demo_prompts.jsonl", [{"prompt": prompt(w), "answer": answer(w)} for w in rl_lists])
    # 2000, not 400: the tiny model fine-tuned on 400 worked reversals (60 epochs) got 28% of held-out final
    # answers right; on 2000 (15 epochs) 100%, so it can teach (recipes/cot_distill.py)
    reason_lists = rngs["reason"].sample(pool, 2000)
    write_jsonl(
        "demo_reasoning.jsonl",
        [{"prompt": prompt(w), "completion": reasoning(w), "answer": answer(w)} for w in reason_lists],
    )
    write_jsonl("demo_judge.jsonl", make_judge(rngs["judge"], pool, vocab))
    write_jsonl("demo_eval_pairs.jsonl", [{"prompt": prompt(w), "chosen": answer(w),
                                           "rejected": wrong_answer(rngs["eval_pairs"], w, vocab)} for w in eval_lists])


if __name__ == "__main__":
    main()
