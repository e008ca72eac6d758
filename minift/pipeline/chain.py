"""What each stage starts from: the base model plus the adapters the chain's stages wrote so far.

``start_from: adapter`` (the default): the chain's adapters, frozen (combined into one exact adapter when there
are several), under a new trainable one. ``merged``: the chain merged into the base, a plain model directory the
stage trains on (later stages build on that). ``base``: the base model alone, and the stage's output stays out of
the chain: a side model (a judge, a teacher, a reward model) that later stages name with ``${stage}``."""

from __future__ import annotations

from pathlib import Path

from minift.pipeline.spec import StageSpec

START = "start"  # inside a stage's directory: the combined adapter or merged model it starts from


class Chain:
    def __init__(self, base: str):
        self.origin = self.base = base
        self.adapters: list[str] = []
        self._started: str | None = None  # the model the last started stage trains on

    def start(self, stage: StageSpec, root: Path, *, write: bool) -> tuple[str, str | None]:
        """``(model_name_or_path, init_adapter)`` of ``stage``; with ``write``, the combined adapter or merged
        model it needs is written to ``root/NN_name/start/`` (main process only)."""
        from minift.lora.merge import combine_adapters, merge_and_save

        where = root / stage.dir_name / START
        if stage.start_from == "base":
            self._started = None
            return self.origin, None
        if stage.start_from == "merged" and self.adapters:
            model = str(where / "model")
            if write:
                merge_and_save(self.base, self.adapters, model)
            self._started = model
            return model, None
        self._started = self.base
        if len(self.adapters) <= 1:
            return self.base, (self.adapters or [None])[0]
        adapter = str(where / "adapter")
        if write:
            combine_adapters(self.adapters, adapter, stage="pipeline")
        return self.base, adapter

    def add(self, stage: StageSpec, produced: str | None, stage_dir: Path) -> None:
        """After ``stage``: its ``adapter`` joins the chain, or its full ``model`` becomes the chain's base."""
        if not stage.in_chain or produced is None:
            return
        if self._started != self.base:  # it trained on a merged chain: that is the chain's base from now on
            self.base, self.adapters = self._started, []
        if produced == "model":
            self.base, self.adapters = str(stage_dir / "model"), []
        else:
            self.adapters.append(str(stage_dir / "adapter"))


def produced(stage_dir: Path) -> str | None:
    """What a finished stage left in its directory: ``adapter``, ``model`` (a full fine-tune) or None."""
    for name in ("adapter", "model"):
        if (stage_dir / name / ("adapter_config.json" if name == "adapter" else "config.json")).is_file():
            return name
    return None
