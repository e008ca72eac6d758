"""Data loading, format detection, chat templating, label masks, and loud errors for broken input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from minift.constants import IGNORE_INDEX
from minift.data.encode import (
    encode_preferences,
    encode_prompts,
    encode_sft,
    encode_unpaired,
    set_chat_template,
)
from minift.data.formats import Chat, Preference, Prompt, Text, Unpaired, normalize_all
from minift.data.read import RecordError, load_records, split_records
from minift.model.load import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data"

ONE_OF_EACH = [
    {"instruction": "Reverse the words.", "input": "cat dog", "output": "dog cat"},
    {"instruction": "Reverse the words: red sun", "response": "sun red"},
    {"prompt": "Reverse the words: one two", "completion": "two one"},
    {"question": "Reverse the words: fox hat", "answer": "hat fox"},
    {"context": "The list is: bell rock", "question": "Reverse it.", "answer": "rock bell"},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Reverse the words: a b"}, {"role": "assistant", "content": "b a"}]},
    {"conversations": [{"from": "human", "value": "Reverse the words: sea sky"}, {"from": "gpt", "value": "sky sea"}]},
    {"text": "the cat sat on the mat"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_model_and_tokenizer(str(tiny_dir))[1]


def trained_text(tok, example) -> str:
    return tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


# ----------------------------------------------------------------------------- formats and rendering


def test_every_sft_format_is_detected_and_rendered(tmp_path, tok, caplog):
    with caplog.at_level(logging.INFO, logger="minift.data.formats"):
        norm = normalize_all(load_records(write_jsonl(tmp_path / "mix.jsonl", ONE_OF_EACH)), "sft")
    assert dict(norm.formats) == {"alpaca": 2, "prompt_completion": 1, "question_answer": 1,
                                  "context_question_answer": 1, "messages": 1, "sharegpt": 1, "text": 1}
    assert "alpaca: 2" in caplog.text and "sharegpt: 1" in caplog.text
    chats = norm.examples
    assert chats[0].messages == [{"role": "user", "content": "Reverse the words.\n\ncat dog"},
                                 {"role": "assistant", "content": "dog cat"}]
    assert chats[4].messages[0]["content"] == "The list is: bell rock\n\nReverse it."
    assert chats[6].messages == [{"role": "user", "content": "Reverse the words: sea sky"},
                                 {"role": "assistant", "content": "sky sea"}]
    assert isinstance(chats[7], Text)
    encoded, report = encode_sft(chats, tok, max_seq_length=128)
    assert report.kept == 8
    answers = ["dog cat", "sun red", "two one", "hat fox", "rock bell", "b a", "sky sea"]
    for example, answer in zip(encoded, answers):
        assert trained_text(tok, example) == answer + "<|im_end|>"
    assert trained_text(tok, encoded[7]) == "the cat sat on the mat<|im_end|>"  # text: everything, EOS appended
    assert tok.decode(encoded[5]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_multi_turn_mask_is_exact(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse the words: cat dog"}, {"role": "assistant", "content": "dog cat"},
                {"role": "user", "content": "Reverse the words: red sun sea"},
                {"role": "assistant", "content": "sea sun red"}]
    (example,), _ = encode_sft([Chat(messages, "t")], tok, max_seq_length=128)
    # Expected: token by token, built from the template's pieces.
    expected_ids, expected_labels = [], []
    for msg in messages:
        head = tok(f"<|im_start|>{msg['role']}\n", add_special_tokens=False).input_ids
        body = tok(msg["content"] + "<|im_end|>", add_special_tokens=False).input_ids
        tail = tok("\n", add_special_tokens=False).input_ids
        expected_ids += head + body + tail
        trained = msg["role"] == "assistant"
        expected_labels += [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body)) \
            + [IGNORE_INDEX] * len(tail)
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels


def test_assistant_content_that_also_appears_in_the_template(tok):
    """A reply like 'a' occurs inside '<|im_start|>assistant' too; the mask must still cover the reply only."""
    for reply in ("a", "assistant", "m", "\n"):
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": reply}]
        (example,), _ = encode_sft([Chat(msgs, "t")], tok, max_seq_length=64)
        assert trained_text(tok, example) == reply + "<|im_end|>", reply


def test_train_on_all(tok):
    (example,), _ = encode_sft([Chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "t")],
                               tok, max_seq_length=64, train_on="all")
    assert example["labels"] == example["input_ids"]


def test_template_without_eos_gets_eos_and_override_file(tiny_dir, tmp_path):
    tok = load_model_and_tokenizer(str(tiny_dir))[1]
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    set_chat_template(tok, template)
    (example,), _ = encode_sft([Chat([{"role": "user", "content": "cat dog"},
                                      {"role": "assistant", "content": "dog cat"}], "t")], tok, max_seq_length=64)
    assert tok.decode(example["input_ids"]) == "user: cat dog\nassistant: dog cat<|im_end|>\n"
    assert trained_text(tok, example) == " dog cat<|im_end|>"  # ' dog' is one token: it carries the space
    with pytest.raises(FileNotFoundError, match="chat template file"):
        set_chat_template(tok, tmp_path / "missing.jinja")


def test_template_that_rewrites_content_falls_back_to_prefix_rendering(tiny_dir):
    tok = load_model_and_tokenizer(str(tiny_dir))[1]
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "cat dog"}, {"role": "assistant", "content": "dog cat"},
            {"role": "user", "content": "red sun"}, {"role": "assistant", "content": "sun red"}]
    (example,), _ = encode_sft([Chat(msgs, "t")], tok, max_seq_length=64)
    assert trained_text(tok, example) == "DOG CAT<|im_end|>SUN RED<|im_end|>"


def test_missing_template_uses_chatml_with_warning(tiny_dir, caplog):
    tok = load_model_and_tokenizer(str(tiny_dir))[1]
    tok.chat_template = None
    with caplog.at_level(logging.WARNING, logger="minift.data.encode"):
        (example,), _ = encode_sft([Chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "t")],
                                   tok, max_seq_length=64)
    assert "no chat template" in caplog.text
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>user\nx<|im_end|>")


def test_preference_formats_and_masks(tok):
    records = normalize_all(load_records(DATA / "demo_preference.jsonl"), "preference")
    assert dict(records.formats) == {"preference": 1500, "preference_implicit": 500}
    implicit = next(ex for ex in records.examples if isinstance(ex, Preference) and len(ex.prompt) == 1
                    and ex.source.endswith(":4"))
    assert implicit.prompt[0]["role"] == "user" and implicit.chosen[0]["role"] == "assistant"
    encoded, report = encode_preferences(records.examples, tok, max_seq_length=128)
    assert len(encoded) == 2000 and report.dropped_no_target == 0
    for ex, pair in zip(records.examples, encoded):
        assert trained_text(tok, {"input_ids": pair["chosen_input_ids"], "labels": pair["chosen_labels"]}) == \
            ex.chosen[0]["content"] + "<|im_end|>"
        assert trained_text(tok, {"input_ids": pair["rejected_input_ids"], "labels": pair["rejected_labels"]}) == \
            ex.rejected[0]["content"] + "<|im_end|>"
        n = pair["chosen_labels"].index(next(l for l in pair["chosen_labels"] if l != IGNORE_INDEX))
        assert pair["chosen_input_ids"][:n] == pair["rejected_input_ids"][:n]  # the same prompt on both sides


def test_unpaired_and_prompt_records(tok):
    kto = normalize_all(load_records(DATA / "demo_kto.jsonl"), "unpaired")
    assert all(isinstance(e, Unpaired) for e in kto.examples)
    encoded, _ = encode_unpaired(kto.examples, tok, max_seq_length=64)
    assert sum(e["label"] for e in encoded) == 1000 and len(encoded) == 2000
    prompts = normalize_all(load_records(DATA / "demo_prompts.jsonl"), "prompt")
    assert isinstance(prompts.examples[0], Prompt) and "answer" in prompts.examples[0].extra
    encoded, _ = encode_prompts(prompts.examples, tok, max_prompt_length=64)
    assert encoded[0]["prompt"].endswith("<|im_start|>assistant\n") and encoded[0]["answer"]
    assert tok.decode(encoded[0]["input_ids"]) == encoded[0]["prompt"]
    msgs = normalize_all(load_records(DATA / "demo_sft.jsonl"), "prompt")  # conversations become prompts
    convo = next(e for e in msgs.examples if len(e.messages) > 1)
    assert convo.messages[-1]["role"] == "user"
    _, report = encode_prompts(prompts.examples, tok, max_prompt_length=8)
    assert report.dropped_too_long == len(prompts.examples) == 4000


# ----------------------------------------------------------------------------- truncation


def test_truncation_is_counted_and_empty_completions_dropped(tok, caplog):
    long_answer = Chat([{"role": "user", "content": "cat"}, {"role": "assistant", "content": "dog " * 40}], "a")
    long_prompt = Chat([{"role": "user", "content": "cat " * 40}, {"role": "assistant", "content": "dog"}], "b")
    short = Chat([{"role": "user", "content": "cat"}, {"role": "assistant", "content": "dog"}], "c")
    with caplog.at_level(logging.WARNING, logger="minift.data.encode"):
        out, report = encode_sft([long_answer, long_prompt, short], tok, max_seq_length=20)
    assert (report.examples, report.kept, report.truncated, report.dropped_no_target) == (3, 2, 2, 1)
    assert len(out[0]["input_ids"]) == 20 and "truncated" in caplog.text
    out, report = encode_sft([long_answer, long_prompt, short], tok, max_seq_length=20, truncation="drop")
    assert (report.kept, report.dropped_too_long, report.truncated) == (1, 2, 0)


# ----------------------------------------------------------------------------- loading


def test_file_types_load_the_same_records(tmp_path):
    rows = [{"prompt": "Reverse the words: a b", "completion": "b a"}, {"prompt": "x", "completion": "y"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("prompt,completion\n\"Reverse the words: a b\",b a\nx,y\n")
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nReverse the words: a b\tb a\nx\ty\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "w.json", "d.csv", "d.tsv", "d.parquet"):
        assert [r.data for r in load_records(tmp_path / name)] == rows, name
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    assert [r.data for r in load_records(tmp_path / "t.txt")] == [{"text": "first line"}, {"text": "second line"}]
    assert load_records(tmp_path / "d.csv")[1].source == f"{tmp_path / 'd.csv'}:3"


def test_directory_splits_and_saved_datasets(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "v"}])
    assert [r.data["text"] for r in load_records(tmp_path, "train")] == ["a", "b"]
    assert [r.data["text"] for r in load_records(tmp_path, "validation")] == ["v"]
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "s"}]), "validation": Dataset.from_list([{"text": "t"}])}) \
        .save_to_disk(str(tmp_path / "saved"))
    assert [r.data for r in load_records(tmp_path / "saved", "validation")] == [{"text": "t"}]
    Dataset.from_list([{"text": "only"}]).save_to_disk(str(tmp_path / "single"))
    assert [r.data for r in load_records(tmp_path / "single")] == [{"text": "only"}]


def test_split_is_deterministic():
    records = list(range(100))
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == records
    assert split_records(records, 0.1, seed=3) == (train, val)
    assert split_records(records, 0.1, seed=4)[1] != val
    with pytest.raises(ValueError, match="validation_split"):
        split_records(records, 1.5, seed=0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content,kind,message", [
    (b'{"text": "ok"}\n{"text": "bad\n', "sft", r"bad\.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"foo": "bar"}\n', "sft", r"bad\.jsonl:2: no known record format in fields \['foo'\]"),
    (b'{"messages": [{"role": "user", "content": 3}]}\n', "sft", r"bad\.jsonl:1: messages\[0\]\.content must be a string"),
    (b'{"messages": "hello"}\n', "sft", r"bad\.jsonl:1: field 'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "sft", r"bad\.jsonl:1: messages\[0\] has unknown role 'wizard'"),
    (b'{"conversations": [{"from": "alien", "value": "hi"}]}\n', "sft", r"bad\.jsonl:1: conversations\[0\] has unknown speaker"),
    (b'{"prompt": "p", "completion": 5}\n', "sft", r"bad\.jsonl:1: field 'completion' must be a non-empty list"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "sft", r"bad\.jsonl:2: not valid UTF-8"),
    (b'[1, 2]\n', "sft", r"bad\.jsonl:1: expected a JSON object"),
    (b'{"prompt": "p", "completion": "c", "label": "yes"}\n', "unpaired", r"bad\.jsonl:1: field 'label' must be true or false"),
    (b'{"text": "plain"}\n', "preference", r"bad\.jsonl:1: a text record cannot be used for preference data"),
    (b'{"text": "a\x00b"}\n', "sft", r"bad\.jsonl:1: a NUL byte at column 12"),
    # Conversations in an order chat templates refuse (and a model should not learn from) are rejected.
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
     b'{"role": "assistant", "content": "c"}]}\n', "sft",
     r"bad\.jsonl:1: messages\[1\] is a second user turn in a row; merge the two into one \(or pass skip_invalid"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}, '
     b'{"role": "assistant", "content": "b"}]}\n', "sft",
     r"bad\.jsonl:1: messages\[0\] is the assistant's, before any user turn"),
    (b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}\n', "sft",
     r"bad\.jsonl:1: messages\[1\] is the assistant's, before any user turn"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     b'{"role": "system", "content": "s"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n',
     "sft", r"bad\.jsonl:1: messages\[2\] is a system message after the first turn"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     b'{"role": "assistant", "content": "c"}]}\n', "sft", r"bad\.jsonl:1: messages\[2\] is a second assistant turn"),
    (b'{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, '
     b'{"from": "gpt", "value": "c"}]}\n', "sft", r"bad\.jsonl:1: conversations\[1\] is a second user turn"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}, '
     b'{"role": "assistant", "content": "c"}]}\n', "sft", r"bad\.jsonl:1: messages\[1\] is a tool result that follows "
                                                        r"no assistant turn"),
    (b'{"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "c"}]}\n', "sft",
     r"bad\.jsonl:1: prompt \+ completion\[1\] is a second user turn"),
    (b'{"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}\n', "preference",
     r"bad\.jsonl:1: prompt \+ chosen\[1\] is a second user turn"),
    (b'{"prompt": "p", "chosen": "red  apple\\n", "rejected": " red apple"}\n', "preference",
     r"bad\.jsonl:1: chosen and rejected differ only in whitespace, so the pair expresses no preference"),
    (b'{"prompt": [{"role": "assistant", "content": "p"}], "completion": "c", "label": true}\n', "unpaired",
     r"bad\.jsonl:1: prompt \+ completion\[0\] is the assistant's"),
    (b'{"messages": [{"role": "assistant", "content": "p"}]}\n', "prompt", r"bad\.jsonl:1: messages\[0\] is the "
                                                                          r"assistant's"),
])
def test_bad_records_name_file_and_line(tmp_path, content, kind, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=message):
        normalize_all(load_records(path), kind)


def test_ordered_conversations_with_tools_and_a_system_message_are_accepted(tmp_path):
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "add 2 and 3"},
             {"role": "assistant", "content": "call add(2, 3)"}, {"role": "tool", "content": "5"},
             {"role": "tool", "content": "(cached)"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": turns}])
    assert normalize_all(load_records(path), "sft").examples[0].messages == turns


def test_txt_line_ends_are_normalized_and_nul_bytes_rejected(tmp_path):
    """Windows line ends read as plain ones and a lone carriage return as a line break inside the record;
    a NUL byte (binary data, a UTF-16 file) is an invalid record naming its line, skippable."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\ntwo\rthree\r\nfour\x00\n\r\nfive\n")
    records = load_records(path)
    assert [r.data for r in records if "__invalid__" not in r.data] == [{"text": "one"}, {"text": "two\nthree"},
                                                                         {"text": "five"}]
    with pytest.raises(RecordError, match=r"t\.txt:3: a NUL byte at column 5"):
        normalize_all(records, "sft")
    assert normalize_all(records, "sft", skip_invalid=True).skipped == [
        f"{path}:3: a NUL byte at column 5 (binary data, or a UTF-16 file?)"]


def test_csv_rows_name_the_line_they_start_on_and_bad_rows_can_be_skipped(tmp_path):
    """A row with more (or fewer) fields than the header, or with bytes that are not UTF-8, is an invalid
    record named by its own line (after a quoted field spanning two lines); --skip_invalid counts them."""
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\n"two\nlines",a\nx,y,extra\nonly\nq,caf\xe9\nr,s\n')
    records = load_records(path)
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["2", "4", "5", "6", "7"]
    with pytest.raises(RecordError, match=r"d\.csv:4: 3 fields, but the header has 2 \(prompt, completion\); quote "
                                          r"a field that holds ','"):
        normalize_all(records, "sft")
    norm = normalize_all(records, "sft", skip_invalid=True)
    assert [e.messages[1]["content"] for e in norm.examples] == ["a", "s"]
    assert [m.split(": ")[0].rsplit(":", 1)[1] for m in norm.skipped] == ["4", "5", "6"]
    assert "d.csv:6: not valid UTF-8" in norm.skipped[2]
    (tmp_path / "h.csv").write_bytes(b"prompt,compl\xe9tion\nx,y\n")
    with pytest.raises(RecordError, match=r"h\.csv:1: header: not valid UTF-8"):
        load_records(tmp_path / "h.csv")


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"oops": 1}\nnot json\n{"text": "b"}\n\xff\n')
    with caplog.at_level(logging.INFO, logger="minift.data.formats"):
        norm = normalize_all(load_records(path), "sft", skip_invalid=True)
    assert len(norm.examples) == 2 and len(norm.skipped) == 3
    assert "skipped as invalid: 3" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_records(tmp_path / "blank.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records("./data/missing")
    (tmp_path / "d.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(RecordError, match=r"d\.json:2: invalid JSON"):
        load_records(tmp_path / "d.json")


def test_explicit_format_turns_detection_off(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}])
    assert isinstance(normalize_all(load_records(path), "sft").examples[0], Chat)
    forced = normalize_all(load_records(path), "sft", fmt="text")
    assert isinstance(forced.examples[0], Text) and dict(forced.formats) == {"text": 1}


def test_demo_eval_is_held_out():
    def word_sets(path):
        out = set()
        for line in path.read_text().splitlines():
            text = json.dumps(json.loads(line))
            out |= {frozenset(m.split()) for m in re.findall(r"Reverse the words: ([a-z ]+)", text)}
        return out

    eval_sets = word_sets(DATA / "demo_eval.jsonl")
    assert len(eval_sets) == 100
    for name in ("demo_sft", "demo_preference", "demo_kto", "demo_prompts", "demo_reasoning", "demo_judge"):
        assert not eval_sets & word_sets(DATA / f"{name}.jsonl"), name
    # the held-out pairs a judge and a reward model are scored on: the eval prompts, right vs wrong answers
    pairs = [json.loads(line) for line in (DATA / "demo_eval_pairs.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (DATA / "demo_eval.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(e["prompt"], e["answer"]) for e in evals]
    assert all(p["rejected"] != p["chosen"] for p in pairs)


def test_byte_order_marks_are_read_as_utf8(tmp_path):
    """Excel's "CSV UTF-8" and Notepad put a byte-order mark before the first line: CSV, JSONL and JSON files
    with one read like the same files without."""
    bom = b"\xef\xbb\xbf"
    files = {"d.csv": b"instruction,output\nReverse the words: a b,b a\n",
             "d.jsonl": b'{"instruction": "Reverse the words: a b", "output": "b a"}\n',
             "d.json": b'[{"instruction": "Reverse the words: a b", "output": "b a"}]'}
    for name, data in files.items():
        plain, marked = tmp_path / f"plain-{name}", tmp_path / f"bom-{name}"
        plain.write_bytes(data)
        marked.write_bytes(bom + data)
        expected = [r.data for r in load_records(plain)]
        assert [r.data for r in load_records(marked)] == expected == [
            {"instruction": "Reverse the words: a b", "output": "b a"}], name
        assert normalize_all(load_records(marked), "sft").examples[0].messages[1]["content"] == "b a"


def test_empty_answers_are_invalid_records(tmp_path):
    """A record whose answers are all empty would train on the end-of-turn token alone: it is an invalid record
    naming its line (skippable), in every conversation format; one empty turn among real answers is kept."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Reverse the words: a b", "completion": ""},
        {"instruction": "Reverse the words: c d", "output": "  "},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello"}]},
        {"question": "Reverse the words: e f", "answer": "f e"}])
    records = load_records(path)
    with pytest.raises(RecordError, match=r"d\.jsonl:1: the assistant's answer is empty"):
        normalize_all(records, "sft")
    norm = normalize_all(records, "sft", skip_invalid=True)
    assert [m.split(": ")[0].rsplit(":", 1)[1] for m in norm.skipped] == ["1", "2", "3"]
    assert [e.messages[-1]["content"] for e in norm.examples] == ["hello", "f e"]
