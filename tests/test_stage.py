"""The stage kit on its own: a toy objective (tests/toy_objective.py) resumes exactly after SIGKILL and
trains the same with two processes as with one; batch positions, the metrics log on resume, checkpoint
atomicity and pruning, schedules, the output-directory guard, and data errors before any weights load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_adapter,
    load_toy_objective,
    reset_accelerate,
    sigkill_when,
)
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "toy_objective.py"


def logged(out: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def toy(*args, timeout: float = 300, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOY), *map(str, args)], cwd=ROOT, text=True, **popen)


# ----------------------------------------------------------------------------- a new objective on the kit


@pytest.mark.slow
def test_toy_objective_resumes_exactly_after_sigkill(tmp_path, tiny_dir):
    """Killed right after checkpoint-8 (each step then pauses 0.3 s, so the kill lands before step 10),
    resumed with ``auto``: the adapter after step 16 and every logged loss equal an uninterrupted run's.
    LoRA dropout and data drawn from per-sequence seeds make this depend on the restored RNG and position;
    the loss falls, so the objective trains."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    reference = toy("--output_dir", whole, "--save_steps", "8", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = toy("--output_dir", killed, "--save_steps", "8", "--step_sleep", "0.3", stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    sigkill_when(victim, killed / "checkpoint-8" / "trainer_state.json")
    assert not (killed / "adapter").exists() and max(logged(killed)) < 10
    resumed = subprocess.run([sys.executable, str(TOY), "--output_dir", str(killed), "--save_steps", "8",
                              "--resume_from_checkpoint", "auto"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and "at step 8" in resumed.stderr, resumed.stderr[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    a, b = load_file(str(killed / "adapter" / "adapter_model.safetensors")), \
        load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = logged(killed)
    assert sorted(losses) == list(range(1, 17))
    assert all(losses[s] == pytest.approx(logged(whole)[s], abs=1e-6) for s in losses)
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5)) - 2.0, losses


@pytest.mark.slow
def test_toy_objective_two_processes_equal_one(tmp_path, tiny_dir):
    """torchrun with 2 CPU processes x 2 sequences trains what 1 process x 4 does: each sequence comes from
    its global position's seed, whichever process makes it."""
    two, one = tmp_path / "two", tmp_path / "one"
    args = ["--max_steps", "6", "--lora_dropout", "0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TOY), *args, "--per_device_train_batch_size", "2", "--output_dir", str(two)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(TOY), *args, "--per_device_train_batch_size", "4", "--output_dir",
                           str(one)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = logged(two), logged(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a), (a, b)
    assert_same_adapter(two / "adapter", one / "adapter", atol=1e-5)


# ----------------------------------------------------------------------------- batches


def test_sharded_batches_split_each_global_batch_and_resume_at_any_index():
    """Process r of N takes slice r of each global micro-batch: together they hold exactly the rows one
    process with N times the batch gets; epoch e reshuffles; a fresh object starting at index i (a resume)
    gives the same micro-batches as one that walked there."""
    from minift.train.batches import ShardedBatches

    rows = list(range(23))
    one = ShardedBatches(rows, 6, 1, 0, seed=3, collate=list)
    shards = [ShardedBatches(rows, 2, 3, r, seed=3, collate=list) for r in range(3)]
    assert one.per_epoch == shards[0].per_epoch == 3  # 23 // 6: the last 5 rows of each shuffle wait
    for index in range(9):
        together = sum((s.micro_batch(index) for s in shards), [])
        assert together == one.micro_batch(index)
        assert len(set(together)) == 6
    epoch0 = sum((one.micro_batch(i) for i in range(3)), [])
    epoch1 = sum((one.micro_batch(i) for i in range(3, 6)), [])
    assert epoch0 != epoch1 and len(set(epoch0)) == 18
    walked = ShardedBatches(rows, 2, 3, 1, seed=3, collate=list)
    [walked.micro_batch(i) for i in range(7)]
    assert ShardedBatches(rows, 2, 3, 1, seed=3, collate=list).micro_batch(7) == walked.micro_batch(7)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(rows, 8, 3, 0, seed=3, collate=list)


def test_online_batches_seed_each_sequence_by_its_global_position():
    """The seeds handed to make_batch depend on the run's seed and each prompt's global position only: the same
    for 1 x 4 and 2 x 2 processes, different at every position and for another seed."""
    from minift.train.batches import OnlineBatches

    def make(prompts, seeds, refill):
        return {"prompts": prompts, "seeds": seeds}

    one = OnlineBatches(list(range(16)), 4, 1, 0, 7, make)
    two = [OnlineBatches(list(range(16)), 2, 2, r, 7, make) for r in range(2)]
    seen = []
    for index in range(8):
        a = one.micro_batch(index)
        b = [t.micro_batch(index) for t in two]
        assert a["prompts"] == b[0]["prompts"] + b[1]["prompts"]
        assert a["seeds"] == b[0]["seeds"] + b[1]["seeds"]
        seen += a["seeds"]
    assert len(set(seen)) == len(seen) == 32
    assert OnlineBatches(list(range(16)), 4, 1, 0, 8, make).micro_batch(0)["seeds"] != one.micro_batch(0)["seeds"]


def test_online_batches_refill_and_repeat_windows():
    """refill(attempt) draws the prompts of the attempt-th next micro-batch with seeds of its own; with repeats 2
    each window of accumulated micro-batches is made once and serves two steps (an epoch has twice the steps)."""
    from minift.train.batches import OnlineBatches

    made = []

    def make(prompts, seeds, refill):
        made.append(prompts)
        return {"prompts": prompts, "seeds": seeds, "more": refill(1)}

    plain = OnlineBatches(list(range(16)), 4, 1, 0, 7, make)
    first, second = plain.micro_batch(0), plain.micro_batch(1)
    assert first["more"][0] == second["prompts"] and set(first["more"][1]).isdisjoint(second["seeds"] + first["seeds"])
    made.clear()
    twice = OnlineBatches(list(range(16)), 2, 1, 0, 7, make, accumulation=2, repeats=2)
    assert twice.per_epoch == 2 * plain.per_epoch * 2
    steps = [[twice.micro_batch(m) for m in range(step * 2, step * 2 + 2)] for step in range(4)]
    assert steps[0][0] is steps[1][0] and steps[0][1] is steps[1][1] and steps[2][0] is steps[3][0]
    assert steps[2][0]["prompts"] == twice.prompts.micro_batch(2)
    assert len(made) == 4  # two windows of two micro-batches


# ----------------------------------------------------------------------------- metrics and checkpoints


class _Main:
    is_main_process, trackers = True, []


def test_metrics_log_drops_what_a_killed_run_logged_past_the_checkpoint(tmp_path):
    from minift.train.outputs import MetricsLog

    log = MetricsLog(_Main(), str(tmp_path))
    for step in range(1, 8):
        log.log({"loss": float(step)}, step)
    resumed = MetricsLog(_Main(), str(tmp_path), resume_step=4)
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    resumed.log({"loss": 0.5}, 5)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert logged(tmp_path)[5] == 0.5


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path):
    """A save that fails half-way leaves no checkpoint-N (nor a temp dir); one that succeeds has every file."""
    from minift.lora.adapters import atomic_directory

    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "checkpoint-3") as tmp:
            (tmp / "optimizer.pt").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "checkpoint-4") as tmp:
        (tmp / "optimizer.pt").write_bytes(b"all")
        assert not (tmp_path / "checkpoint-4").exists()  # invisible until complete
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").read_bytes() == b"all"


def test_pruning_keeps_the_limit_the_newest_and_the_best(tmp_path):
    from minift.train.checkpoints import (
        find_checkpoint,
        prune_checkpoints,
        write_manifest,
    )

    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(tmp_path / f"checkpoint-{step}")
    prune_checkpoints(tmp_path, 3, keep=[tmp_path / "checkpoint-10", str(tmp_path / "checkpoint-4")])
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir()) == [4, 8, 10]
    prune_checkpoints(tmp_path, 0, keep=[])  # 0 = no limit
    assert len(list(tmp_path.iterdir())) == 3
    assert find_checkpoint(str(tmp_path), "auto") == tmp_path / "checkpoint-10"


@pytest.mark.parametrize("kind,name", [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_equal_transformers(kind, name, warmup):
    """minift writes its schedules (importing transformers' pulls in peft and bitsandbytes): same values."""
    from types import SimpleNamespace

    from transformers import get_scheduler

    from minift.train.setup import make_scheduler

    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    a = make_scheduler(SimpleNamespace(warmup_steps=warmup, warmup_ratio=0.0, lr_scheduler_type=kind), ours, 17)
    b = get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=17)
    for _ in range(18):
        assert a.get_last_lr()[0] == pytest.approx(b.get_last_lr()[0], abs=1e-12)
        ours.step(), theirs.step(), a.step(), b.step()


# ----------------------------------------------------------------------------- the front door


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, in_process):
    """A second run into the same output_dir fails before any model loads, naming both ways on; with
    --overwrite_output_dir the old checkpoints and logs go, other files (a reference cache) stay."""
    from minift.config import ConfigError

    toy_module = load_toy_objective()
    out = tmp_path / "run"
    cfg = toy_module.ToyConfig(output_dir=str(out), max_steps=2, save_steps=1)
    toy_module.main(cfg)
    (out / "reference_logps.safetensors").write_bytes(b"cache")
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"holds an earlier run \(adapter, checkpoint-1, checkpoint-2, "
                                          r"metrics.jsonl\); pass --resume_from_checkpoint auto .* "
                                          r"--overwrite_output_dir true"):
        toy_module.main(toy_module.ToyConfig(output_dir=str(out), max_steps=2))
    reset_accelerate()
    toy_module.main(toy_module.ToyConfig(output_dir=str(out), max_steps=1, overwrite_output_dir=True))
    assert sorted(p.name for p in out.iterdir()) == [".minift.lock", "adapter", "metrics.jsonl",
                                                     "reference_logps.safetensors", "run.json"]
    assert list(logged(out)) == [1]


def weightless_model(tiny_dir: Path, tmp_path: Path) -> Path:
    """The tiny model's directory without its weights: anything that loads weights from it fails."""
    out = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def data_error_cases(tmp_path: Path) -> dict[str, tuple[str, list, str]]:
    """name -> (recipe, arguments, the expected ``error:`` line)."""
    files = {"broken.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "empty.jsonl": "",
             "shape.jsonl": '{"foo": 1}\n', "role.jsonl": '{"messages": [{"role": "robot", "content": "hi"}]}\n',
             "sft.jsonl": '{"prompt": "a", "completion": "b"}\n' * 40}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    d = tmp_path
    return {
        "broken json": ("sft", [d / "broken.jsonl"], f"{d / 'broken.jsonl'}:2: invalid JSON"),
        "empty file": ("sft", [d / "empty.jsonl"], f"{d / 'empty.jsonl'} is empty"),
        "unknown shape": ("sft", [d / "shape.jsonl"], f"{d / 'shape.jsonl'}:1: no known record format in fields ['foo']"),
        "bad role": ("sft", [d / "role.jsonl"], f"{d / 'role.jsonl'}:1: messages[0] has unknown role 'robot'"),
        "sft records to dpo": ("dpo", [d / "sft.jsonl"], f"{d / 'sft.jsonl'}:1:"),
        "too few rows": ("sft", [d / "sft.jsonl", "--per_device_train_batch_size", "16", "--validation_split", "0",
                                 "--max_seq_length", "128"],  # a model directory: the real-model default is 1,024
                         f"{d / 'sft.jsonl'}: the training data makes 5 packed rows from 40 examples, fewer than one "
                         f"batch (16); lower --per_device_train_batch_size to 5 or less, or add data"),
    }


@pytest.mark.slow
def test_data_errors_fail_before_any_weights_load(tmp_path, tiny_dir):
    """Each broken dataset ends the run with exit status 1 and one ``error:`` line naming the file (and line),
    no traceback, against a model directory without weights: nothing tried to load them."""
    model = weightless_model(tiny_dir, tmp_path)
    procs = {}
    for name, (recipe, args, _) in data_error_cases(tmp_path).items():
        argv = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--model_name_or_path", str(model),
                "--dataset_name_or_path", *map(str, args), "--output_dir", str(tmp_path / "out" / name.replace(" ", "_"))]
        procs[name] = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        expected = data_error_cases(tmp_path)[name][2]
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in stderr, (name, stderr[-2000:])
        assert last.startswith(f"error: {expected}"), (name, last)


@pytest.mark.slow
def test_data_errors_under_accelerate_launch(tmp_path, tiny_dir):
    """``accelerate launch`` passes the recipe's one ``error:`` line through and exits 1; what it adds is its
    own traceback of the child's exit status (``CalledProcessError``), after the line, with no traceback of
    the recipe's."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "recipes" / "sft.py"),
                           "--model_name_or_path", str(weightless_model(tiny_dir, tmp_path)),
                           "--dataset_name_or_path", str(empty), "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    at = lines.index(f"error: {empty} is empty")
    assert all("recipes/sft.py" not in line for line in lines[:at]), proc.stderr[-2000:]
    assert "CalledProcessError" in lines[-1] and "returned non-zero exit status 1" in lines[-1]
