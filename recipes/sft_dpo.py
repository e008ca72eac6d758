"""SFT, then DPO starting from the SFT adapter: the two recipes chained by the adapters they save.

    accelerate launch recipes/sft_dpo.py                               # the bundled demo, CPU, a few minutes
    accelerate launch recipes/sft_dpo.py --sft_config my_sft.yaml --dpo_config my_dpo.yaml --merge true --output_dir out/my_chain
    accelerate launch --multi_gpu --num_processes 2 recipes/sft_dpo.py

Writes ``output_dir/sft`` and ``output_dir/dpo`` (each stage's adapter, metrics and run.json),
``output_dir/final``: one adapter equal to SFT followed by DPO (exact: rank r_sft + r_dpo), and with
``--merge true`` ``output_dir/merged``, a plain model directory. Copy this file to chain your own stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from dpo import DPOConfig
from dpo import main as dpo
from sft import SFTConfig
from sft import main as sft

from minift.config import ConfigError, config_from_dict, read_yaml
from minift.lora.merge import combine_adapters, merge_and_save
from minift.train.stage import run_recipe


@dataclass
class ChainConfig:
    output_dir: str = field(default="out/sft_dpo", metadata={"help": "stages write to sft/, dpo/, final/ in here"})
    model_name_or_path: str = field(default="tiny", metadata={"help": "the base model of both stages"})
    sft_config: str | None = field(default=None, metadata={"help": "YAML of SFT options (default: the demo)"})
    dpo_config: str | None = field(default=None, metadata={"help": "YAML of DPO options (default: the demo)"})
    merge: bool = field(default=False, metadata={"help": "also write the merged model to output_dir/merged"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an earlier chain's runs in output_dir"})


def stage_config(cls, path: str | None, **fixed):
    """A stage's config from its YAML file (if any); the chain sets the base model, output_dir and init adapter."""
    entries = read_yaml(path) if path else {}
    clash = sorted(set(entries) & set(fixed))
    if clash:
        raise ConfigError(f"{path}: {', '.join(clash)} is set by sft_dpo.py itself; remove it from the file")
    values = {k: v for k, (v, _) in entries.items()}
    return config_from_dict(cls, {**values, **fixed}, where=path or cls.__name__,
                            lines={k: line for k, (_, line) in entries.items()})


def main(cfg: ChainConfig) -> dict:
    out = Path(cfg.output_dir)
    # Both stage configs are read and checked before anything trains.
    fixed = {"model_name_or_path": cfg.model_name_or_path, "overwrite_output_dir": cfg.overwrite_output_dir}
    sft_cfg = stage_config(SFTConfig, cfg.sft_config, output_dir=str(out / "sft"), **fixed)
    dpo_cfg = stage_config(DPOConfig, cfg.dpo_config, output_dir=str(out / "dpo"), init_adapter=None, **fixed)
    if sft_cfg.mixed_precision != dpo_cfg.mixed_precision:
        raise ConfigError(f"mixed_precision is {sft_cfg.mixed_precision} for SFT but {dpo_cfg.mixed_precision} for "
                          f"DPO: both stages run in this one process, where Accelerate fixes it; use the same value")
    sft_result = sft(sft_cfg)
    # DPO starts from the SFT adapter (its reference model is base + SFT adapter).
    dpo_result = dpo(dataclasses.replace(dpo_cfg, init_adapter=str(out / "sft" / "adapter")))

    state = PartialState()
    if state.is_main_process:
        combine_adapters([out / "sft" / "adapter", out / "dpo" / "adapter"], out / "final", stage="sft_dpo")
        if cfg.merge:
            merge_and_save(cfg.model_name_or_path, [out / "final"], out / "merged")
        rows = [("base", sft_result.get("answer_accuracy_before"), dpo_result.get("preference_accuracy_base")),
                ("after SFT", sft_result.get("answer_accuracy"), dpo_result.get("preference_accuracy_before")),
                ("after DPO", dpo_result.get("answer_accuracy"), dpo_result.get("preference_accuracy"))]
        print(results_table(rows, dpo_result))
        print(f"adapters: {out / 'sft' / 'adapter'}, {out / 'dpo' / 'adapter'}; combined: {out / 'final'}"
              + (f"; merged model: {out / 'merged'}" if cfg.merge else ""))
    state.wait_for_everyone()
    return {"sft": sft_result, "dpo": dpo_result}


def results_table(rows: list[tuple], dpo_result: dict) -> str:
    """Demo exact match and held-out preference accuracy (the model's own log-probs rank chosen first)."""
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:4.0f}%"

    lines = ["", f"{'model':<10} {'demo exact match':>16} {'prefers chosen':>15}"]
    lines += [f"{name:<10} {pct(a):>16} {pct(p):>15}" for name, a, p in rows]
    if "eval_rewards/accuracies" in dpo_result:
        lines.append(f"DPO implicit-reward accuracy on held-out pairs: {pct(dpo_result['eval_rewards/accuracies'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_recipe(main, ChainConfig, __doc__)
