"""The pipeline's last step: the chain's final model as one adapter, a merged model, a GGUF file (with an Ollama
Modelfile) and a hub upload, all in ``output_dir/export``."""

from __future__ import annotations

import logging
from pathlib import Path

from minift.pipeline.chain import Chain
from minift.pipeline.spec import ExportConfig

logger = logging.getLogger(__name__)


def export_chain(chain: Chain, cfg: ExportConfig, out: Path) -> dict:
    """Write what ``cfg`` asks for from ``chain`` (its base plus adapters) to ``out``; returns the paths written."""
    from minift.export.gguf.convert import convert
    from minift.lora.merge import combine_adapters, merge_and_save
    from minift.model.load import tiny_model_dir
    from minift.train.outputs import push_to_hub

    written: dict[str, str] = {}
    if cfg.adapter and chain.adapters:
        written["adapter"] = str(combine_adapters(chain.adapters, out / "adapter", stage="pipeline"))
    if cfg.merge:
        written["merged"] = str(merge_and_save(chain.base, chain.adapters, out / "merged") if chain.adapters
                                else chain.base)
    if cfg.gguf_outtype:
        base = str(tiny_model_dir()) if chain.base == "tiny" else chain.base
        gguf = out / f"model-{cfg.gguf_outtype}.gguf"
        source = (written["merged"], []) if "merged" in written and chain.adapters else (base, chain.adapters)
        written["gguf"] = str(convert(source[0], gguf, outtype=cfg.gguf_outtype, adapters=source[1],
                                      ollama=cfg.ollama))
        if cfg.ollama:
            written["modelfile"] = str(out / "Modelfile")
    if cfg.hub_repo_id:
        folder = written.get("merged") or written.get("adapter")
        if folder is None:
            raise ValueError("export.hub_repo_id: nothing to upload; set export.merge or keep export.adapter true")
        written["hub_url"] = push_to_hub(Path(folder), cfg.hub_repo_id, private=cfg.hub_private,
                                         message="Upload from a minift pipeline")
    for name, path in written.items():
        logger.info("export %s: %s", name, path)
    return written
