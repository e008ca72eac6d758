"""recipes/pipeline.py: --dry_run catches each kind of mistake without reading a weights file, in well under 5 s;
a re-run skips what is done and redoes what changed; --stages; a SIGKILLed stage resumes to the same adapter; a
custom stage from a module of the user's gets the previous result; a failing stage stops the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPES, ROOT, _ProcessState, load_recipe, sigkill_when
from safetensors.torch import load_file

from minift.config import ConfigError
from minift.data.read import RecordError

PIPELINE = RECIPES / "pipeline.py"
DATA = RECIPES / "data"
QUICK_SFT = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1}
QUICK_DPO = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1}


@pytest.fixture(scope="module")
def pipeline(tiny_dir, monkeypatch_session):
    monkeypatch_session.syspath_prepend(str(RECIPES))
    monkeypatch_session.syspath_prepend(str(Path(__file__).parent))  # the custom stage, tests/pipeline_gate.py
    return load_recipe("pipeline")


def write(path: Path, data: dict) -> Path:
    """A pipeline file; ``json`` is valid YAML, one key per line so that errors have lines to name."""
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run(pipeline, config: Path, *flags: str) -> dict:
    with _ProcessState():
        return pipeline.main(pipeline.parse_args(["--config", str(config), *flags]))


@pytest.fixture
def model_without_weights(tiny_dir, tmp_path):
    """The tiny model's directory with its weights file replaced by junk: anything that reads it fails."""
    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    for weights in out.glob("*.safetensors"):
        weights.write_bytes(b"not weights" * 100)
    return out


def five_stages(model: Path, out: Path, **changes) -> dict:
    stages = {"sft": {**QUICK_SFT}, "dpo": {**QUICK_DPO}, "judge": {**QUICK_SFT},
              "rlaif": {"judge_model_name_or_path": str(model), "judge_adapter": ["${judge}/adapter"], "max_steps": 2,
                        "per_device_train_batch_size": 4},
              "grpo": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4},
              "distill": {"teacher_model_name_or_path": str(model), "max_steps": 2}}
    for key, value in changes.items():
        stage, option = key.split("__")
        stages[stage][option] = value
    return {"model_name_or_path": str(model), "output_dir": str(out),
            "stages": ["sft", "dpo", {"name": "judge", "recipe": "sft", "start_from": "base"}, "rlaif", "grpo",
                       "distill"],
            "stage_configs": stages}


def test_dry_run_plans_five_stages_fast_and_reads_no_weights(pipeline, model_without_weights, tmp_path, capsys):
    config = write(tmp_path / "p.yaml", five_stages(model_without_weights, tmp_path / "out"))
    started = time.perf_counter()
    plans = run(pipeline, config, "--dry_run")["plan"]
    elapsed = time.perf_counter() - started
    assert elapsed < 5, elapsed
    printed = capsys.readouterr().out
    assert [p.stage.dir_name for p in plans] == ["01_sft", "02_dpo", "03_judge", "04_rlaif", "05_grpo", "06_distill"]
    assert [p.steps for p in plans] == [3, 4, 3, 2, 2, 2]
    assert plans[0].examples == {"train": 4750, "eval": 250} and plans[3].examples == {"train": 4000}
    assert plans[4].chain == [str(tmp_path / "out" / d / "adapter") for d in ("01_sft", "02_dpo", "04_rlaif")]
    assert plans[3].config.judge_adapter == [str(tmp_path / "out" / "03_judge" / "adapter")]  # ${judge} resolved
    assert "model + sft + dpo + rlaif" in printed and "alpaca 1571" in printed
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("mistake, message", [
    ({"dpo__betta": 0.1}, r"p.yaml:\d+: unknown key 'betta'; did you mean 'beta'\? \[stage dpo, dpo\]"),
    ({"sft__dataset_name_or_path": "missing.jsonl"}, "dataset_name_or_path: missing.jsonl does not exist"),
    ({"rlaif__judge_model_name_or_path": "${jugde}"}, r"refers to \$\{jugde\}, which is no stage; did you mean "
                                                      r"\$\{judge\}\?"),
    ({"grpo__num_generations": 3}, r"per_device_train_batch_size \(8\) counts completions and must divide by "
                                   r"num_generations \(3\)"),
    ({"dpo__output_dir": "x"}, "stage_configs.dpo.output_dir is set by the pipeline"),
])
def test_dry_run_names_the_mistake(pipeline, model_without_weights, tmp_path, mistake, message):
    """Each error names the pipeline file and the line of the option at fault."""
    config = write(tmp_path / "p.yaml", five_stages(model_without_weights, tmp_path / "out", **mistake))
    with pytest.raises((ConfigError, FileNotFoundError), match=message) as error:
        run(pipeline, config, "--dry_run")
    line = int(str(error.value).split("p.yaml:", 1)[1].split(":", 1)[0])
    option = next(iter(mistake)).split("__")[1]
    faulty = {"num_generations": "per_device_train_batch_size"}.get(option, option)  # the check names the batch first
    assert f'"{faulty}"' in config.read_text().splitlines()[line - 1]


def test_dry_run_names_a_malformed_record_and_a_teacher_of_another_vocabulary(pipeline, model_without_weights,
                                                                            gpt2_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    lines = (DATA / "demo_preference.jsonl").read_text().splitlines()[:40]
    lines[6] = json.dumps({"prompt": "p", "chosen": "a"})  # no rejected answer
    bad.write_text("\n".join(lines) + "\n")
    config = write(tmp_path / "p.yaml", five_stages(model_without_weights, tmp_path / "out",
                                                    dpo__dataset_name_or_path=str(bad)))
    with pytest.raises(RecordError, match=r"pairs.jsonl:7: .*rejected"):
        run(pipeline, config, "--dry_run")
    other = tmp_path / "other"  # the tiny GPT-2 with a tokenizer whose ids differ
    shutil.copytree(gpt2_dir, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    swapped = dict(vocab["model"]["vocab"])
    (a, ia), (b, ib) = list(swapped.items())[300:302]
    swapped[a], swapped[b] = ib, ia
    vocab["model"]["vocab"] = swapped
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    config = write(tmp_path / "p.yaml", five_stages(model_without_weights, tmp_path / "out",
                                                    distill__teacher_model_name_or_path=str(other)))
    with pytest.raises(ConfigError, match="another vocabulary than the student"):
        run(pipeline, config, "--dry_run")


def quick_chain(tmp_path: Path, dpo: dict | None = None, gate: bool = False) -> Path:
    stages = ["sft", *([{"name": "gate", "recipe": "pipeline_gate"}] if gate else []), "dpo"]
    return write(tmp_path / "p.yaml", {"model_name_or_path": "tiny", "output_dir": str(tmp_path / "out"),
                                       "stages": stages, "stage_configs": {"sft": QUICK_SFT, "dpo": dpo or QUICK_DPO},
                                       "export": {"adapter": True}})


def mtimes(out: Path) -> dict[str, float]:
    return {d.name: (d / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns for d in out.glob("0*")
            if (d / "adapter").is_dir()}


def test_rerun_skips_finished_stages_and_redoes_a_changed_one(pipeline, tmp_path, monkeypatch):
    config = quick_chain(tmp_path)
    run(pipeline, config)
    out = tmp_path / "out"
    first = mtimes(out)
    record = json.loads((out / "pipeline.json").read_text())
    assert [record["stages"][s]["status"] for s in ("sft", "dpo", "export")] == ["finished"] * 3
    assert "| sft | finished | 3 |" in (out / "summary.md").read_text()
    run(pipeline, config)
    assert mtimes(out) == first  # nothing retrained
    # a changed export reruns alone: merged model, and the upload (here recorded instead of sent)
    pushed = []
    monkeypatch.setattr("minift.train.outputs.push_to_hub", lambda folder, repo, **kw: pushed.append((folder, repo))
                        or f"https://huggingface.co/{repo}")
    data = json.loads(config.read_text())
    write(config, {**data, "export": {"merge": True, "hub_repo_id": "me/chain"}})
    run(pipeline, config)
    assert mtimes(out) == first and pushed == [(out / "export" / "merged", "me/chain")]
    assert (out / "export" / "merged" / "config.json").is_file()
    assert json.loads((out / "pipeline.json").read_text())["stages"]["export"]["outputs"]["hub_url"] == \
        "https://huggingface.co/me/chain"
    write(config, data)
    run(pipeline, quick_chain(tmp_path, dpo={**QUICK_DPO, "beta": 0.5}))
    again = mtimes(out)
    assert again["01_sft"] == first["01_sft"] and again["02_dpo"] != first["02_dpo"]
    # --stages: only DPO, from the SFT adapter on disk; the export is not named, so it stays as it was
    exported = (out / "export" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    run(pipeline, config, "--stages", "dpo")
    assert mtimes(out)["01_sft"] == first["01_sft"] and mtimes(out)["02_dpo"] != again["02_dpo"]
    assert (out / "export" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == exported
    run(pipeline, config, "--stages", "export")  # named: it runs again, from the stages on disk
    assert (out / "export" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns != exported
    with pytest.raises(ConfigError, match="--stages: no stage 'dpoo'"):
        run(pipeline, config, "--stages", "dpoo")
    shutil.rmtree(out / "01_sft")
    with pytest.raises(ConfigError, match="stage 1 'sft' comes first and has not finished"):
        run(pipeline, config, "--stages", "dpo")


def test_help_lists_the_flags(pipeline, capsys):
    with pytest.raises(SystemExit) as exit_:
        pipeline.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--config", "--stages", "--dry_run", "--output_dir", "--model_name_or_path"))


def test_a_custom_stage_gets_the_previous_result_and_a_failing_stage_stops_the_pipeline(pipeline, tmp_path):
    run(pipeline, quick_chain(tmp_path, gate=True))
    out = tmp_path / "out"
    first, report = mtimes(out), (out / "02_gate" / "gate.json").stat().st_mtime_ns
    run(pipeline, tmp_path / "p.yaml")  # a stage that writes no adapter is finished too: nothing runs again
    assert mtimes(out) == first and (out / "02_gate" / "gate.json").stat().st_mtime_ns == report
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    gate = json.loads((out / "02_gate" / "gate.json").read_text())
    # the gate measured the chain after SFT: the same model, the same greedy answers as SFT's own measurement
    assert gate["previous_stage"] == ["sft"] and gate["claimed"] == record["sft"]["result"]["answer_accuracy"]
    assert gate["answer_accuracy"] == gate["claimed"]
    dpo_run = json.loads((out / "03_dpo" / "run.json").read_text())
    assert dpo_run["parents"] == [str(out / "01_sft" / "adapter")]  # the gate wrote no adapter: DPO starts from SFT
    data = json.loads((tmp_path / "p.yaml").read_text())
    data["stage_configs"]["gate"] = {"max_drop": -1.0}  # now no model can pass
    write(tmp_path / "p.yaml", data)
    before = mtimes(out)
    with pytest.raises(pipeline.StageFailed, match=r"stage 2 'gate' \(pipeline_gate\) failed: exact match"):
        run(pipeline, tmp_path / "p.yaml")
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    assert record["gate"]["status"] == "failed" and "exact match" in record["gate"]["error"]
    assert mtimes(out) == before and record["sft"]["status"] == "finished"  # earlier outputs intact


def test_a_pipeline_killed_in_stage_2_resumes_it_to_the_uninterrupted_adapter(tiny_dir, tmp_path):
    dpo = {**QUICK_DPO, "max_steps": 30, "save_steps": 10}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name: str) -> subprocess.Popen:
        (tmp_path / name).mkdir()
        config = quick_chain(tmp_path / name, dpo=dpo)
        return subprocess.Popen([sys.executable, str(PIPELINE), "--config", str(config)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    whole = launch("whole")
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    killed = launch("killed")
    sigkill_when(killed, tmp_path / "killed" / "out" / "02_dpo" / "checkpoint-10" / "trainer_state.json")
    record = json.loads((tmp_path / "killed" / "out" / "pipeline.json").read_text())["stages"]
    assert record["sft"]["status"] == "finished" and record["dpo"]["status"] == "running"
    again = subprocess.run([sys.executable, str(PIPELINE), "--config", str(tmp_path / "killed" / "p.yaml")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1 sft: finished, config unchanged: skipped" in again.stderr
    assert "stage 2 dpo (dpo): resuming from its newest checkpoint" in again.stderr
    assert "resumed from" in again.stderr and "at step 10" in again.stderr
    for part in ("02_dpo/adapter", "export/adapter"):  # the stage's adapter, and SFT + DPO combined
        assert max_difference(tmp_path / "whole" / "out" / part, tmp_path / "killed" / "out" / part) <= 1e-6


def max_difference(a: Path, b: Path) -> float:
    """The largest element difference between two adapters' tensors (their configs name different paths)."""
    first, second = (load_file(str(d / "adapter_model.safetensors")) for d in (a, b))
    assert first.keys() == second.keys() and first
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_two_processes_run_a_pipeline_as_one_with_twice_the_batch(pipeline, tmp_path):
    """torchrun, 2 CPU processes x batch 2, against this process x batch 4: the same adapters. DPO starts from the
    SFT chain merged into a model (start_from: merged), which every process then loads."""
    def config(name: str, batch: int) -> Path:
        (tmp_path / name).mkdir()
        return write(tmp_path / name / "p.yaml", {
            "model_name_or_path": "tiny", "output_dir": str(tmp_path / name / "out"),
            "stages": ["sft", {"name": "dpo", "recipe": "dpo", "start_from": "merged"}],
            "stage_configs": {"sft": {**QUICK_SFT, "per_device_train_batch_size": batch, "validation_split": 0},
                              "dpo": {**QUICK_DPO, "per_device_train_batch_size": batch, "validation_split": 0}}})

    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(PIPELINE), "--config", str(config("two", 2))], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    run(pipeline, config("one", 4))
    for name in ("two", "one"):
        dpo = json.loads((tmp_path / name / "out" / "02_dpo" / "run.json").read_text())
        assert dpo["config"]["model_name_or_path"] == str(tmp_path / name / "out" / "02_dpo" / "start" / "model")
        assert dpo["parents"] == []  # the SFT adapter is in the merged model, not under the new one
    for stage in ("01_sft", "02_dpo"):  # each module's weight delta (see conftest's assert_same_adapter)
        a, b = (load_file(str(tmp_path / name / "out" / stage / "adapter" / "adapter_model.safetensors"))
                for name in ("two", "one"))
        for key in (k for k in a if k.endswith("lora_A.weight")):
            up = key.replace("lora_A", "lora_B")
            assert (a[up] @ a[key] - b[up] @ b[key]).abs().max() <= 1e-5, (stage, key)


@pytest.mark.parametrize("name", ["pipeline_sft", "pipeline_sft_dpo", "pipeline_ppo", "pipeline_chain"])
def test_shipped_pipelines_are_headed_by_their_command_and_plan_cleanly(pipeline, name, tmp_path):
    path = RECIPES / "configs" / f"{name}.yaml"
    assert path.read_text().startswith(f"# accelerate launch recipes/pipeline.py --config recipes/configs/{name}.yaml\n")
    plans = run(pipeline, path, "--dry_run", "--output_dir", str(tmp_path / "out"))["plan"]
    assert all(p.steps for p in plans if p.stage.recipe != "cot_distill")


@pytest.mark.slow
def test_the_seeds_chain_runs_from_yaml_and_every_stage_keeps_or_improves_its_metric(tiny_dir, tmp_path):
    """recipes/configs/pipeline_chain.yaml as the README runs it: SFT -> DPO -> (judge) -> RLAIF -> GRPO -> (reasoner)
    -> CoT distillation -> export, within 12 minutes on 2 cores (about 3 here). Exact match may not fall by more
    than one held-out prompt in 100 at any stage after SFT."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(PIPELINE), "--config", "recipes/configs/pipeline_chain.yaml",
                           "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=720)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 720
    out = tmp_path / "out"
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    result = {name: entry.get("result", {}) for name, entry in stages.items()}
    assert all(entry["status"] == "finished" for entry in stages.values())
    assert result["sft"]["answer_accuracy"] >= 0.9 and result["sft"]["answer_accuracy_before"] == 0.0
    for name in ("dpo", "rlaif", "grpo"):
        assert result[name]["answer_accuracy"] >= result[name]["answer_accuracy_before"] - 0.01, (name, result[name])
    assert result["dpo"]["answer_accuracy_before"] == result["sft"]["answer_accuracy"]  # DPO starts where SFT ended
    assert result["dpo"]["eval_rewards/accuracies"] >= 0.85
    assert result["rlaif"]["eval_true_win_rate"] >= 0.5  # against the start model: not worse
    assert result["cot_distill"]["teacher_accuracy"] >= 0.9
    assert result["cot_distill"]["final_answer_accuracy"] >= result["cot_distill"]["final_answer_accuracy_before"] + 0.5
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | finished |" in summary for name in result if name != "export")
    from gguf import GGUFReader  # the oracle reads the exported file

    reader = GGUFReader(str(out / "export" / "model-q8_0.gguf"))
    assert len(reader.tensors) == 21 and "FROM ./model-q8_0.gguf" in (out / "export" / "Modelfile").read_text()
    print(f"seeds' chain: {elapsed:.0f} s\n{summary}")


def test_a_single_recipe_dry_run_counts_its_data_without_weights(pipeline, model_without_weights, tmp_path):
    from minift.train.dry_run import recipe_dry_run

    sft, grpo = load_recipe("sft"), load_recipe("grpo")
    text = recipe_dry_run(sft.SFTConfig(model_name_or_path=str(model_without_weights), output_dir=str(tmp_path / "o"),
                                        max_seq_length=64), "sft")
    assert "examples: train 4750, eval 250; steps: " in text and "sharegpt 532" in text
    steps = int(text.split("steps: ")[1].split()[0])
    assert steps > 1675  # 64-token rows hold fewer examples than the default 128-token ones (1,675 steps)
    # The first training example as encoded, with exactly its trained tokens (the answer and <|im_end|>) marked.
    assert text.endswith("first training example, trained tokens between [[ ]]:\n      <|im_start|>user\n"
                         "      Reverse the words.\n\n      black nine duck peach<|im_end|>\n"
                         "      <|im_start|>assistant\n      [[peach duck nine black<|im_end|>]]"), text
    text = recipe_dry_run(grpo.GRPOConfig(model_name_or_path=str(model_without_weights), max_steps=0,
                                          num_train_epochs=1.0, output_dir=str(tmp_path / "g")), "grpo")
    assert "examples: train 4000; steps: 250" in text  # 4,000 prompts / (128 completions / 8 per prompt)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


def test_a_key_given_twice_in_a_stage_is_named(pipeline, tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("output_dir: out\nstages: [sft]\nstage_configs:\n  sft:\n    beta: 1\n    max_steps: 3\n"
                      "    max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"p.yaml:7: key 'stage_configs.sft.max_steps' is given twice \(first on "
                                          r"line 6\)"):
        run(pipeline, config, "--dry_run")


def test_a_full_fine_tune_becomes_the_chains_base(pipeline, tmp_path):
    out = tmp_path / "out"
    config = write(tmp_path / "p.yaml", {"model_name_or_path": "tiny", "output_dir": str(out), "stages": ["sft", "dpo"],
                                         "stage_configs": {"sft": {**QUICK_SFT, "lora_r": 0}, "dpo": QUICK_DPO},
                                         "export": {"merge": True}})
    plans = run(pipeline, config, "--dry_run")["plan"]
    assert plans[1].model == str(out / "01_sft" / "model") and plans[1].init_adapter is None
    run(pipeline, config)
    dpo = json.loads((out / "02_dpo" / "run.json").read_text())
    assert dpo["config"]["model_name_or_path"] == str(out / "01_sft" / "model") and dpo["parents"] == []
    export = json.loads((out / "pipeline.json").read_text())["stages"]["export"]["outputs"]
    assert export["adapter"] == str(out / "export" / "adapter") and export["merged"] == str(out / "export" / "merged")
