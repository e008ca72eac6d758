"""End-to-end tests of recipes/sft.py on the tiny model: the training loop's promises, not its pieces.

Each test runs the real recipe (in-process through ``main`` or as a subprocess, as a user would) on a
few dozen demo records with 64-128-token rows, and checks a property that breaks if the feature does:
token-weighted gradient accumulation, exact resume after SIGKILL, two processes = one, QLoRA and full
fine-tunes learn, config errors are clean and early, NaN stops with the last good checkpoint kept,
checkpoint pruning, and that the default demo actually teaches the task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_adapter,
    load_recipe,
    model_for_training,
    reset_accelerate,
    sigkill_when,
)
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "recipes" / "sft.py"
DEMO = ROOT / "recipes" / "data" / "demo_sft.jsonl"
# Small and fast: no held-out split, no generation eval, a loss record every step; rank 16 rather than the
# demo's 32 (half the adapter, and these tests should not move when the demo's defaults do).
TINY_RUN = ["--max_seq_length", "64", "--per_device_train_batch_size", "2", "--validation_split", "0",
            "--answer_eval_dataset", "none", "--logging_steps", "1", "--lora_r", "16", "--lora_alpha", "32"]


# ----------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def sft():
    return load_recipe("sft")


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    """The first 64 demo records: every record format the demo mixes, ~1,800 tokens."""
    path = tmp_path_factory.mktemp("sft-data") / "train.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:64]))
    return path


def run_sft(*args, env: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``python recipes/sft.py ARGS`` as a user runs it (inherits MINIFT_CACHE, so it reuses the tiny model)."""
    proc = subprocess.run([sys.executable, str(SFT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"sft.py {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged(out: Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of one metric from metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def base_cfg(sft, data, out, **overrides):
    """An SFTConfig for a tiny in-process run (same settings as TINY_RUN)."""
    kwargs = dict(dataset_name_or_path=str(data), output_dir=str(out), max_seq_length=64, per_device_train_batch_size=2,
                  validation_split=0.0, answer_eval_dataset=None, logging_steps=1, lora_r=16, lora_alpha=32.0)
    return sft.SFTConfig(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------- 1. gradient accumulation


def test_accumulation_weights_every_token_equally(sft, data64, tmp_path, in_process):
    """4 micro-batches of 2 rows = 1 batch of 8 rows: same loss, gradient norm and adapter after 3 steps.

    The micro-batches hold different numbers of trained tokens, so averaging per-micro-batch means
    (what ``loss / accum`` does) weights tokens unequally; the check below shows that this would
    move the gradient by far more than the tolerance, so the end-to-end comparison has teeth."""
    from minift.train.batches import ShardedBatches
    from minift.train.forward import CausalLMLoss, trained_tokens

    # The data really is uneven, and the naive average really is different.
    cfg = base_cfg(sft, data64, tmp_path / "probe")
    torch.manual_seed(cfg.seed)  # the LoRA init (the fixture restores the RNG)
    model, tokenizer = model_for_training(cfg)
    rows, _, collate, _ = sft.build_data(cfg, tokenizer)
    small, big = (ShardedBatches(rows, n, 1, 0, cfg.seed, collate) for n in (2, 8))
    window = [small.micro_batch(i) for i in range(4)]
    counts = [int(trained_tokens(b)) for b in window]
    assert len(set(counts)) > 1, counts
    assert sum(counts) == int(trained_tokens(big.micro_batch(0)))  # the same 8 rows
    loss_model = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(losses) -> torch.Tensor:
        g = torch.autograd.grad(sum(losses), params, allow_unused=True)
        return torch.cat([x.flatten() for x in g if x is not None])

    total = sum(counts)
    token_weighted = grad([loss_model(**b)[0] / total for b in window])
    naive = grad([loss_model(**b)[0] / n / len(window) for b, n in zip(window, counts)])
    ce_big, n_big = loss_model(**big.micro_batch(0))
    one_batch = grad([ce_big / n_big])
    print("relative gradient error: token-weighted", ((token_weighted - one_batch).norm() / one_batch.norm()).item(),
          "naive", ((naive - one_batch).norm() / one_batch.norm()).item())
    assert (token_weighted - one_batch).norm() <= 1e-5 * one_batch.norm()
    assert (naive - one_batch).norm() > 1e-2 * one_batch.norm()

    # The recipe's loop: accumulation 4 x batch 2 against batch 8.
    accumulated = sft.main(base_cfg(sft, data64, tmp_path / "accum", per_device_train_batch_size=2,
                                    gradient_accumulation_steps=4, max_steps=3))
    reset_accelerate()
    single = sft.main(base_cfg(sft, data64, tmp_path / "single", per_device_train_batch_size=8,
                               gradient_accumulation_steps=1, max_steps=3))
    assert accumulated["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    for key in ("loss", "grad_norm"):
        a, b = logged(tmp_path / "accum", key), logged(tmp_path / "single", key)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in a:
            assert a[step] == pytest.approx(b[step], abs=1e-5), (key, step)
    assert max_abs_diff(adapter(tmp_path / "accum"), adapter(tmp_path / "single")) <= 1e-5


# ----------------------------------------------------------------------------- 2. exact resume after SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(data64, tmp_path, tiny_dir):
    """Kill -9 a run right after checkpoint-10, resume with ``auto``: the adapter after step 20 equals an
    uninterrupted run's. LoRA dropout makes the result depend on the restored RNG; 128-token rows over
    3 epochs put the resume point mid-epoch, so the data order must be restored too."""
    args = ["--dataset_name_or_path", data64, *TINY_RUN, "--max_seq_length", "128", "--max_steps", "20",
            "--save_steps", "10", "--lora_dropout", "0.1"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, str(SFT), *map(str, args)]
    # The uninterrupted reference runs alongside (results do not depend on scheduling).
    reference = subprocess.Popen([*cmd, "--output_dir", str(whole)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*cmd, "--output_dir", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    sigkill_when(victim, killed / "checkpoint-10" / "trainer_state.json")
    if (killed / "checkpoint-20").exists() or (killed / "adapter").exists():
        pytest.fail("the run finished before SIGKILL landed; the test needs slower steps (raise max_seq_length)")
    assert max(logged(killed)) < 20

    resumed = run_sft(*args, "--output_dir", killed, "--resume_from_checkpoint", "auto")
    assert "at step 10" in resumed.stderr  # resumed from checkpoint-10, not from scratch
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    assert max_abs_diff(adapter(killed), adapter(whole)) <= 1e-6
    # metrics.jsonl holds each step once: what the killed run logged past step 10 was dropped.
    lines = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 21))
    a, b = logged(killed), logged(whole)
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in range(1, 21))


# ----------------------------------------------------------------------------- 3. two processes = one


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_batch(data64, tmp_path, tiny_dir):
    """torchrun with 2 CPU processes (gloo) x batch 2 trains the same adapter as 1 process x batch 4:
    the data is sharded, not duplicated, and the loss is normalized by the tokens of all processes.
    The final evaluation (eval batches split over the processes, sums reduced) agrees too."""
    args = ["--dataset_name_or_path", data64, *TINY_RUN, "--max_steps", "6", "--validation_split", "0.2",
            "--per_device_eval_batch_size", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SFT), *map(str, args), "--per_device_train_batch_size", "2", "--output_dir", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"two processes: {time.monotonic() - started:.1f} s")
    run_sft(*args, "--per_device_train_batch_size", "4", "--output_dir", one)
    # Each process sees a quarter-size epoch's worth of rows: epoch progress shows the global batch is 4.
    assert logged(two, "epoch")[1] == pytest.approx(logged(one, "epoch")[1])
    for key in ("loss", "grad_norm"):
        a, b = logged(two, key), logged(one, key)
        assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in range(1, 7)), key
    assert_same_adapter(two / "adapter", one / "adapter", atol=1e-5)
    assert logged(two, "eval_loss")[6] == pytest.approx(logged(one, "eval_loss")[6], abs=1e-5)
    assert logged(two, "eval_token_acc")[6] == logged(one, "eval_token_acc")[6]


# ----------------------------------------------------------------------------- 4-5. QLoRA and full fine-tune learn


def spy_on_model(sft, monkeypatch) -> dict:
    """Make ``main`` hand over the model and tokenizer it trains (filled in when its stage loads them)."""
    import minift.train.stage

    seen = {}
    load = minift.train.stage.load_for_training

    def spying(cfg, tokenizer, *task):
        seen["model"], seen["tokenizer"] = load(cfg, tokenizer, *task), tokenizer
        return seen["model"]

    monkeypatch.setattr(minift.train.stage, "load_for_training", spying)
    return seen


def fixed_batch_loss(sft, cfg, model, tokenizer) -> float:
    """Mean cross-entropy over the trained tokens of the first 8 training rows (no dropout, no grad)."""
    from minift.train.forward import CausalLMLoss

    rows, _, collate, _ = sft.build_data(cfg, tokenizer)
    loss_model = CausalLMLoss(model).eval()
    with torch.no_grad():
        total, count = loss_model(**collate(rows[:8]))
    return (total / count).item()


def test_qlora_trains_on_a_4bit_base(sft, data64, tmp_path, in_process, monkeypatch):
    """``use_4bit``: the base's linear layers are bitsandbytes NF4, only the adapter trains, and the loss on
    a fixed batch of training rows falls by more than a fifth in 8 steps (13.2 -> 9.0 measured)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = base_cfg(sft, data64, tmp_path, use_4bit=True, per_device_train_batch_size=4, max_steps=8)
    seen = spy_on_model(sft, monkeypatch)
    before = {}
    import minift.train.stage

    load = minift.train.stage.load_for_training

    def measure_before(c, tokenizer, *task):  # B = 0 at init, so this is the 4-bit base model's loss
        model = load(c, tokenizer, *task)
        before["loss"] = fixed_batch_loss(sft, c, model, tokenizer)
        return model

    monkeypatch.setattr(minift.train.stage, "load_for_training", measure_before)
    result = sft.main(cfg)
    model, tokenizer = seen["model"], seen["tokenizer"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14  # 7 projections x 2 layers
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    after = fixed_batch_loss(sft, cfg, model, tokenizer)
    assert after < 0.8 * before["loss"], (before, after)
    assert result["step"] == 8 and len(logged(tmp_path)) == 8
    assert any(t.abs().max() > 0 for k, t in adapter(tmp_path).items() if "lora_B" in k)


def test_full_finetune_writes_a_loadable_model(sft, data64, tmp_path, in_process, monkeypatch):
    """``lora_r 0``: every weight trains; ``output_dir/model`` (weights + tokenizer) loads with the Auto
    classes and gives exactly the trained model's loss, which is well below the base model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minift.model.load import load_model_and_tokenizer

    cfg = base_cfg(sft, data64, tmp_path, lora_r=0, per_device_train_batch_size=4, max_steps=10)
    seen = spy_on_model(sft, monkeypatch)
    sft.main(cfg)
    assert not (tmp_path / "adapter").exists()
    base, tokenizer = load_model_and_tokenizer("tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model")  # a complete model directory, usable as a next base
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # all weights trained, embeddings and norms included
    base_loss = fixed_batch_loss(sft, cfg, base, tokenizer)
    loaded_loss = fixed_batch_loss(sft, cfg, loaded, tokenizer)
    assert loaded_loss == pytest.approx(fixed_batch_loss(sft, cfg, seen["model"], tokenizer), abs=1e-5)
    assert loaded_loss < 0.67 * base_loss, (base_loss, loaded_loss)


# ----------------------------------------------------------------------------- 6. config errors


def bad_config_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    """name -> (command-line arguments, the message expected on the ``error:`` line)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: 5\nlerning_rate: 0.001\n")
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("# comment\nmax_steps: ten\n")
    return {
        "yaml key": (["--config", bad_yaml],
                     f"{bad_yaml}:2: unknown key 'lerning_rate'; did you mean 'learning_rate'?"),
        "yaml value": (["--config", bad_value], f"{bad_value}:2: max_steps: expected an integer, got 'ten'"),
        "cli flag": (["--lerning_rate", "1e-3"], "command line: unknown flag --lerning_rate; did you mean --learning_rate?"),
        "negative lr": (["--learning_rate", "-1e-4"], "command line: learning_rate must be > 0, got -0.0001"),
        "lora dropout": (["--lora_dropout", "1.5"], "command line: lora_dropout must be in [0, 1), got 1.5"),
        "missing file": (["--dataset_name_or_path", "data/missing.jsonl"],
                         "dataset_name_or_path: data/missing.jsonl does not exist"),
        "missing dir": (["--dataset_name_or_path", tmp_path / "nowhere"],
                        f"dataset_name_or_path: {tmp_path / 'nowhere'} does not exist"),
        "missing template": (["--chat_template", "chatml.jinja"], "chat_template: chatml.jinja does not exist"),
    }


def test_bad_configs_raise_clear_errors(sft, tmp_path, monkeypatch):
    """Each mistake raises an error the recipe turns into one ``error:`` line (ConfigError or
    FileNotFoundError), naming the key, the file and line where there is one, and the fix."""
    from minift.config import ConfigError, parse_config

    monkeypatch.chdir(tmp_path)
    for name, (args, expected) in bad_config_cases(tmp_path).items():
        with pytest.raises((ConfigError, FileNotFoundError)) as err:
            parse_config(sft.SFTConfig, [str(a) for a in args])
        assert str(err.value) == expected, name


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_units_warns(sft, tmp_path, in_process, monkeypatch, caplog, native):
    """PyTorch's bf16 matmul fallback is ~100x slower than fp32 on CPUs without AVX-512 / AMX: say so."""
    import minift.train.setup as train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    reset_accelerate()
    with caplog.at_level("WARNING", logger="minift.train.setup"):
        accelerator = train.make_accelerator(base_cfg(sft, DEMO, tmp_path, mixed_precision="bf16"))
    assert accelerator.mixed_precision == "bf16"
    assert ("without native bf16 matrix units" in caplog.text) == (not native)


def test_config_errors_exit_cleanly_before_loading_a_model(data64, tmp_path, tiny_dir):
    """As a user sees them: exit status 1, the message as the last line, no traceback, and no model built
    or loaded (the tiny model would be built into the empty MINIFT_CACHE given to these runs). An
    unknown target module needs the model; its message lists the model's linear layer names, and a LoRA rank
    above a layer's dimensions names the layer."""
    cases = bad_config_cases(tmp_path)
    out = ["--output_dir", tmp_path / "out", "--dataset_name_or_path", data64]
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    env = {**os.environ, "MINIFT_CACHE": str(empty_cache)}
    # Side by side: each run is mostly interpreter start-up and imports.
    procs = {name: subprocess.Popen([sys.executable, str(SFT), *map(str, out + cases[name][0])], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("yaml key", "negative lr", "missing file")}
    rank = subprocess.Popen([sys.executable, str(SFT), "--output_dir", str(tmp_path / "out-rank"),
                             "--dataset_name_or_path", str(data64), "--per_device_train_batch_size", "2",
                             "--lora_r", "128"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = run_sft(*out, "--target_modules", "foo_proj,bar", "--max_steps", "1", "--per_device_train_batch_size", "2",
                     check=False)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in stderr, (name, stderr)
        assert stderr.strip().splitlines()[-1] == f"error: {cases[name][1]}", (name, stderr)
    assert not any(empty_cache.iterdir()), "a model was built or loaded before the config was checked"

    assert target.returncode == 1 and "Traceback" not in target.stderr, target.stderr[-3000:]
    message = target.stderr.strip().splitlines()[-1]
    assert message.startswith("error: target_modules=['foo_proj', 'bar'] matched no linear layer"), message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "error: LoRA rank 128 is larger than model.layers.0.self_attn.q_proj's dimensions (64 in, 64 out), so it "
        "adds parameters but no capacity; use --lora_r 64 or less (or a rank_pattern entry for such layers)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-rank").exists()  # nor even their locks


def test_padded_rows_round_up_to_pad_to_multiple_of(sft, data64, tmp_path, tiny_dir):
    """``packing false, pad_to_multiple_of 16``: every padded batch the recipe builds is a multiple of 16 wide."""
    from minift.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_dir))
    cfg = base_cfg(sft, data64, tmp_path, packing=False, pad_to_multiple_of=16)
    rows, _, collate, _ = sft.build_data(cfg, tokenizer)
    widths = {collate(rows[i: i + 3])["input_ids"].shape[1] for i in range(0, 30, 3)}
    assert widths and all(w % 16 == 0 for w in widths), widths
    assert min(widths) < max(len(r["input_ids"]) for r in rows)  # per batch, not the longest overall


# ----------------------------------------------------------------------------- 7. NaN


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sft, data64, tmp_path, in_process, monkeypatch):
    """A loss that turns NaN at step 5 stops the run with a message naming step 5 and checkpoint-4;
    nothing NaN is saved (no checkpoint-5/6, no final adapter) and checkpoint-4 loads and is finite."""
    from minift.constants import DEFAULT_ADAPTER
    from minift.lora.adapters import load_adapter
    from minift.train.forward import CausalLMLoss

    forward, calls = CausalLMLoss.forward, []

    def poisoned(self, **batch):  # one micro-batch per step: call k is step k
        loss, count = forward(self, **batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 5 else loss), count

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    cfg = base_cfg(sft, data64, tmp_path, max_steps=10, save_steps=2)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5; stopping\. The last good checkpoint is "
                                                 rf"{tmp_path / 'checkpoint-4'}\. Lower the learning rate"):
        sft.main(cfg)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    monkeypatch.undo()
    model, _ = model_for_training(cfg)
    load_adapter(model, tmp_path / "checkpoint-4" / "adapter", adapter_name=DEFAULT_ADAPTER, trainable=True)
    weights = adapter(tmp_path / "checkpoint-4")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)  # trained, not the init


def test_nan_after_weights_blew_up_names_the_last_checkpoint_with_sane_weights(sft, data64, tmp_path, in_process,
                                                                              monkeypatch):
    """A weight pushed to 1e6 after step 4 (as a diverging run does): checkpoint-6 is saved but marked
    unhealthy with a warning, and the NaN at step 7 names checkpoint-4, not checkpoint-6."""
    from minift.train.forward import CausalLMLoss

    forward, calls = CausalLMLoss.forward, []

    def diverging(self, **batch):
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                next(p for n, p in self.named_parameters() if "lora_A" in n).view(-1)[0] = 1e6
        loss, count = forward(self, **batch)
        return (loss * float("nan") if len(calls) >= 7 else loss), count

    monkeypatch.setattr(CausalLMLoss, "forward", diverging)
    with pytest.raises(FloatingPointError, match=rf"loss is nan at step 7; stopping\. The last good checkpoint is "
                                                 rf"{tmp_path / 'checkpoint-4'}\."):
        sft.main(base_cfg(sft, data64, tmp_path, max_steps=10, save_steps=2))
    states = {n: json.loads((tmp_path / f"checkpoint-{n}" / "trainer_state.json").read_text()) for n in (4, 6)}
    assert states[4]["healthy"] and not states[6]["healthy"]
    assert states[6]["warnings"][0].startswith("huge weights: trainable weights reach 1e+06 at step 5")


def test_a_diverged_run_says_so(sft, data64, tmp_path, caplog):
    """lr 1e6 saturates the model at once (loss flat, gradient norm 0): the run ends with both warnings in its
    summary and run.json, and its checkpoints are not good ones to resume (resuming one says so)."""
    out = tmp_path / "out"
    proc = run_sft("--dataset_name_or_path", data64, "--output_dir", out, *TINY_RUN, "--learning_rate", "1e6",
                   "--max_steps", "8", "--save_steps", "4")
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert sorted(w.split(":")[0] for w in warnings) == ["huge weights", "zero gradient"], warnings
    assert "warning: zero gradient: the gradient norm has been 0 since step " in proc.stderr
    assert not json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["healthy"]
    from minift.train.checkpoints import find_checkpoint

    with caplog.at_level("WARNING", logger="minift.train.checkpoints"):
        assert find_checkpoint(str(out), "auto") == out / "checkpoint-8"  # resumable, but not without a word
    assert f"{out / 'checkpoint-8'} was saved with diverged weights" in caplog.text
    assert "the last good checkpoint is none" in caplog.text


# ----------------------------------------------------------------------------- 8. checkpoint pruning


def test_pruning_keeps_the_newest_and_the_best(sft, data64, tmp_path, in_process, monkeypatch):
    """``save_steps 2, save_total_limit 2`` with scripted eval losses (best at step 4, then at step 10):
    after every save the newest and the best checkpoint exist, at most 2 remain, oldest go first."""
    eval_losses = iter([3.0, 1.0, 2.0, 1.5, 0.5, 1.1])  # steps 2, 4, ..., 12
    monkeypatch.setattr(sft, "evaluate", lambda *a: {"eval_loss": next(eval_losses)})
    import minift.train.stage

    listings, save = [], minift.train.stage.save_checkpoint

    def recording(accelerator, output_dir, weights, optimizer, scheduler, state, **options):
        path = save(accelerator, output_dir, weights, optimizer, scheduler, state, **options)
        listings.append((state["step"], sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))))
        return path

    monkeypatch.setattr(minift.train.stage, "save_checkpoint", recording)
    cfg = base_cfg(sft, data64, tmp_path, max_steps=12, save_steps=2, eval_steps=2, save_total_limit=2,
                   validation_split=0.1)
    sft.main(cfg)
    assert listings == [(2, [2]), (4, [2, 4]), (6, [4, 6]), (8, [4, 8]), (10, [8, 10]), (12, [10, 12])]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["best_checkpoint"] == str(tmp_path / "checkpoint-10")
    state = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["best_eval_loss"] == 0.5 and state["best_checkpoint"] == str(tmp_path / "checkpoint-10")
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temp dirs left behind


# ----------------------------------------------------------------------------- 9. the demo learns


@pytest.mark.slow
def test_default_demo_run_learns_the_task(demo_chain):
    """The SFT stage of ``recipes/sft_dpo.py`` as shipped, which is ``recipes/sft.py`` with its defaults (5,000
    demo records, 25 epochs of batch 16, LoRA r=32 on the tiny model): held-out exact match on 100 unseen word
    lists goes from 0% to at least 90% (95% measured, at 1 and 2 threads) in about 110 s on 2 CPU cores. Other
    seeds land lower (77%, 83%): this checks the shipped default, not every seed."""
    out, result, _ = demo_chain
    sft_result = result["sft"]
    assert sft_result["answer_accuracy_before"] <= 0.02
    assert sft_result["answer_accuracy"] >= 0.9
    assert sft_result["eval_loss"] < 0.4  # from ~13 before training; 0.20 measured
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
