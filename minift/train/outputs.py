"""What a stage writes besides weights: metrics.jsonl and trackers, the loss plot, run.json, model cards,
the hub upload, and a throughput meter."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from minift.config import config_to_dict
from minift.sections import TrainConfig

logger = logging.getLogger(__name__)


def start_trackers(accelerator, cfg: TrainConfig, project: str) -> None:
    """Start ``cfg.report_to``'s tracker with the config, its files kept in output_dir unless the tracker's own
    environment says otherwise: TensorBoard events in ``output_dir/<project>``, an offline or online W&B run's
    files in ``output_dir/wandb``, and, without ``MLFLOW_TRACKING_URI``, an MLflow file store ``output_dir/mlruns``."""
    out = Path(cfg.output_dir).resolve()
    options = {}
    if cfg.report_to == "wandb":
        out.mkdir(parents=True, exist_ok=True)
        options = {"wandb": {"dir": str(out)}}
    if cfg.report_to == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to file stores
        mlflow.set_tracking_uri((out / "mlruns").as_uri())
    accelerator.init_trackers(project, config={k: str(v) for k, v in vars(cfg).items()}, init_kwargs=options)


class MetricsLog:
    """Appends metrics to ``output_dir/metrics.jsonl`` and any Accelerate tracker (main process only)."""

    def __init__(self, accelerator, output_dir: str, resume_step: int = 0):
        self.accelerator, self.path = accelerator, Path(output_dir) / "metrics.jsonl"
        self.history: list[dict] = []
        if accelerator.is_main_process and self.path.exists():  # keep what a resumed run already logged
            records, torn = [], []
            for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill mid-write
                    torn.append(number)
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    records.append(record)
            if torn:
                logger.warning("%s: dropped unreadable line(s) %s (cut short when the run was killed)", self.path,
                               ", ".join(map(str, torn)))
            self.history = records
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        self.history.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)

_PLOT_SKIPPED = []


def plot_losses(history: list[dict], path: Path) -> Path | None:
    """A loss-curve PNG when matplotlib is installed (``pip install matplotlib``, or the ``[plot]`` extra); else None, said once."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _PLOT_SKIPPED:
            logger.info("loss plot skipped: matplotlib is not installed (pip install matplotlib)")
            _PLOT_SKIPPED.append(True)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_json(cfg: TrainConfig, output_dir: str, **fields) -> Path:
    """``run.json``: the config, output paths, final metrics and timings; what callers and pipelines read back."""
    path = Path(output_dir) / "run.json"
    path.write_text(json.dumps({"config": config_to_dict(cfg), **fields}, indent=2, default=str) + "\n")
    return path


class HubPushError(RuntimeError):
    """The upload failed; everything it would have uploaded is saved locally."""


def push_to_hub(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Upload ``folder`` to ``repo_id`` as one commit (token from HF_TOKEN or the login cache; never logged)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as err:  # offline, a bad token, no rights: the run itself is done and saved
        raise HubPushError(f"pushing {folder} to {repo_id} failed ({type(err).__name__}: {err}); everything is "
                           f"saved locally in {folder.parent}; push it later with: hf upload "
                           f"{repo_id} {folder}") from err
    return f"https://huggingface.co/{repo_id}"


def write_model_card(folder: Path, cfg: TrainConfig, stage: str, metrics: dict) -> Path:
    """``folder/README.md``: hub metadata (base model, library, tags), the training config and final metrics."""
    full = (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()
    tags = ["minift", stage] + ([] if full else ["lora"])
    lines = ["---", f"base_model: {cfg.model_name_or_path}", f"library_name: {'transformers' if full else 'peft'}",
             "tags:", *[f"- {t}" for t in tags], "---", "", f"# {folder.parent.name or folder.name}: {stage}", "",
             f"Trained with minift's `{stage}` recipe from `{cfg.model_name_or_path}`"
             + (f" after `{cfg.init_adapter}`." if cfg.init_adapter else "."), "", "## Final metrics", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines += ["", "## Training config", "", "```json", json.dumps(config_to_dict(cfg), indent=2, default=str), "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


class Throughput:
    """Tokens per second over the steps since the last call."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate
