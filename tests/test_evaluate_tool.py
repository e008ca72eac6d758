"""tools/evaluate.py: the SFT recipe's eval loss reproduced, the demo's side-by-side table, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_recipe, readme_row

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "evaluate.py"
DEMO = ROOT / "recipes" / "data"


def run_tool(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_perplexity_is_exp_of_the_sft_recipes_eval_loss(tiny_dir, tmp_path, in_process):
    """A short SFT run with a held-out eval file (every record format the demo mixes, packed rows); evaluate.py on
    the adapter it saved and the same file gives perplexity = exp(eval_loss) and the same token accuracy."""
    lines = (DEMO / "demo_sft.jsonl").read_text().splitlines(keepends=True)
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(lines[:48]))
    held_out.write_text("".join(lines[48:80]))
    sft = load_recipe("sft")
    out = tmp_path / "sft"
    result = sft.main(sft.SFTConfig(dataset_name_or_path=str(train), eval_dataset=str(held_out), output_dir=str(out),
                                    max_seq_length=64, per_device_train_batch_size=4, max_steps=30,
                                    answer_eval_dataset=None, lora_r=8, lora_alpha=16.0, learning_rate=4e-3))
    report = tmp_path / "eval.json"
    proc = run_tool(tiny_dir, "--adapter", f"sft={out / 'adapter'}", "--dataset", held_out, "--max_seq_length", 64,
                    "-o", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(report.read_text())
    assert saved["adapters"] == {"sft": str(out / "adapter")} and set(saved["results"]) == {"base", "sft"}
    got = saved["results"]["sft"]
    assert got["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-4)
    assert got["token_accuracy"] == pytest.approx(result["eval_token_acc"], abs=1e-9)
    assert saved["results"]["base"]["loss"] > got["loss"] + 1  # trained a little; the base is measured without it
    assert f"| loss | {saved['results']['base']['loss']:.4f} | {got['loss']:.4f} |" in proc.stdout.splitlines()
    assert got["answered"] == 32  # every held-out record ends in an answer: greedy exact match is measured too


@pytest.mark.slow
def test_side_by_side_table_shows_the_demo_learning(demo_chain, tiny_dir, tmp_path):
    """Base, SFT, DPO and the combined adapter of the shipped demo on its held-out prompts: exact match rises
    from 0% (base) to the SFT stage's own greedy figure (95% measured), and DPO keeps it."""
    out, result, _ = demo_chain
    report = tmp_path / "demo.json"
    proc = run_tool(tiny_dir, "--adapter", f"sft={out / 'sft' / 'adapter'}", "--adapter", f"dpo={out / 'dpo' / 'adapter'}",
                    "--adapter", f"final={out / 'final'}", "--dataset", DEMO / "demo_eval.jsonl",
                    "--max_new_tokens", 16, "-o", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(report.read_text())["results"]
    print(proc.stdout)
    assert proc.stdout.splitlines()[0] == "| metric | base | sft | dpo | final |"
    assert results["base"]["exact_match"] <= 0.02 and results["base"]["answered"] == 100
    assert results["sft"]["exact_match"] == pytest.approx(result["sft"]["answer_accuracy"])
    assert results["sft"]["exact_match"] >= 0.9
    assert results["sft"]["contains"] >= results["sft"]["exact_match"]
    assert results["sft"]["loss"] < results["base"]["loss"] / 10
    # The DPO adapter alone sits on top of SFT: without it, it is not the demo model; the combined one is.
    assert results["final"]["exact_match"] >= 0.85
    # The README's table of this run (base, sft, final): exact match within one point; each loss within 1% of the
    # figure shown, or inside the range shown (the trained losses differ by a third between the project's CPUs).
    columns = ("base", "sft", "final")
    for cell, column in zip(readme_row("exact_match"), columns, strict=True):
        assert abs(int(cell.rstrip("%")) - 100 * results[column]["exact_match"]) <= 1, (column, cell)
    for cell, column in zip(readme_row("loss"), columns, strict=True):
        low, _, high = cell.partition("-")
        got = results[column]["loss"]
        assert (float(low) <= round(got, 2) <= float(high)) if high else got == pytest.approx(float(low), rel=0.01), \
            (column, cell, got)


def test_bad_input_is_reported_before_loading(tiny_dir, random_adapters, gpt2_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_tool(tiny_dir, "--dataset", empty)
    assert proc.returncode == 1 and "is empty" in proc.stderr, proc.stderr
    proc = run_tool(tiny_dir, "--dataset", DEMO / "demo_preference.jsonl", "--no_generate")
    assert proc.returncode == 1 and "none of the" in proc.stderr and "demo_preference.jsonl:1" in proc.stderr
    proc = run_tool(tiny_dir, "--adapter", f"x={tmp_path}", "--dataset", DEMO / "demo_eval.jsonl")
    assert proc.returncode == 1 and "holds no adapter_config.json" in proc.stderr
    proc = run_tool(tiny_dir, "--adapter", f"g={random_adapters / 'gpt2'}", "--dataset", DEMO / "demo_eval.jsonl")
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    proc = run_tool(tiny_dir, "--dataset", bad)
    assert proc.returncode == 1 and "bad.jsonl:2" in proc.stderr, proc.stderr
