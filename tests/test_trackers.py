"""Trackers and hub output, read back with each library's own reader: TensorBoard event files, an MLflow file
store, an offline Weights & Biases run; the model card of every saved adapter; the hub upload's commit message
and a token that never reaches the logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "data" / "demo_sft.jsonl"


@pytest.fixture(scope="module")
def sft():
    return load_recipe("sft")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tracker-data") / "train.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:40]))
    return path


def short_run(sft, data, out, **overrides) -> dict:
    cfg = sft.SFTConfig(dataset_name_or_path=str(data), output_dir=str(out), max_seq_length=64, max_steps=4,
                        per_device_train_batch_size=2, validation_split=0.1, answer_eval_dataset=None,
                        logging_steps=1, lora_r=8, lora_alpha=16.0, **overrides)
    return sft.main(cfg)


def logged_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_tensorboard_events_hold_the_logged_metrics(sft, data, tmp_path, in_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    short_run(sft, data, out, report_to="tensorboard")
    acc = EventAccumulator(str(out / "minift-sft"))  # the run's events (accelerate puts the config one level down)
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("loss")}
    assert losses == pytest.approx(logged_losses(out), abs=1e-5)
    assert [e.step for e in acc.Scalars("eval_loss")] == [4]


def test_mlflow_file_store_in_output_dir_holds_the_logged_metrics_and_config(sft, data, tmp_path, in_process, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # minift's default: a file store in output_dir
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    short_run(sft, data, out, report_to="mlflow")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "minift-sft"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(logged_losses(out), abs=1e-5)
    assert run.data.params["learning_rate"] == str(sft.SFTConfig.learning_rate)


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-*.wandb``), decoded with wandb's own protobuf schema. wandb
    0.31 ships no Python reader for offline runs: the file is a 7-byte header (``:W&B``, magic, version) and then
    LevelDB-log framing (32 KiB blocks; records of a 7-byte header, crc32 / length / type, and a payload that
    FULL = 1 holds whole and FIRST / MIDDLE / LAST = 2 / 3 / 4 hold in pieces)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4: pos + 6], "little"), raw[pos + 6]
        payload, pos = raw[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_logged_metrics(sft, data, tmp_path, in_process, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    short_run(sft, data, out, report_to="wandb")
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")  # the run's files stay in output_dir
    # wandb's writer is a separate process (wandb-core): wait, bounded, for the log's closing "exit" record.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after 60 s"
        time.sleep(0.2)
    losses, config = {}, {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "loss" in items:
                losses[items["_step"]] = items["loss"]
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert losses == pytest.approx(logged_losses(out), abs=1e-5)
    assert config["lora_r"] == "8"


def test_model_card_and_hub_push_with_a_commit_message_and_no_token_in_any_output(sft, data, tmp_path, in_process,
                                                                                  monkeypatch, caplog):
    """The saved adapter carries a model card (base model, library, tags, final metrics, the config); the hub
    upload creates the repository and pushes the adapter folder in one commit with the configured message; the
    token (HF_TOKEN) appears in no log, metrics file, card or run.json."""
    import huggingface_hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id, commit_message))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_4242")
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        result = short_run(sft, data, out, push_to_hub=True, hub_repo_id="me/tiny-sft",
                           hub_commit_message="SFT on the demo")
    assert calls == [("create", "me/tiny-sft", True),
                     ("upload", ["README.md", "adapter_config.json", "adapter_model.safetensors"], "me/tiny-sft",
                      "SFT on the demo")]
    card = (out / "adapter" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\nlibrary_name: peft\ntags:\n- minift\n- sft\n- lora\n---\n")
    assert f"| eval_loss | {result['eval_loss']:.4g} |" in card and '"learning_rate": 0.004' in card
    run = json.loads((out / "run.json").read_text())
    assert run["hub_url"] == "https://huggingface.co/me/tiny-sft"
    written = "".join(p.read_text() for p in (out / "run.json", out / "metrics.jsonl", out / "adapter" / "README.md"))
    assert "hf_not_a_real_token_4242" not in written + caplog.text
