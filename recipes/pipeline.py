"""Any recipes, in any order, from one YAML file: each stage starts from the chain the earlier ones trained.

    accelerate launch recipes/pipeline.py --config recipes/configs/pipeline_sft_dpo.yaml
    accelerate launch recipes/pipeline.py --config recipes/configs/pipeline_chain.yaml --dry_run
    accelerate launch recipes/pipeline.py --config my.yaml --stages dpo grpo --output_dir out/try2

The file names the base model, ``output_dir``, the ``stages`` (a recipe's file name, or a user's ``package.module``
with a config dataclass and ``main(config, previous)``), ``stage_configs`` (each stage's recipe options; ``${name}``
is an earlier stage's output directory) and an ``export`` step. Stage N writes ``output_dir/NN_<name>/``.
Everything is checked first (``--dry_run`` stops there: no weights load). ``output_dir/pipeline.json`` records
each stage's config hash and status: a re-run skips finished stages whose config is unchanged, re-runs a changed
stage and all after it, and resumes an interrupted one from its newest checkpoint. ``--stages`` runs only the
stages named (again, if they had finished), the others' outputs being read from disk. At the end a summary table
is printed and written to ``output_dir/summary.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from accelerate import PartialState

from minift.config import ConfigError
from minift.pipeline import Previous
from minift.pipeline.chain import Chain, produced
from minift.pipeline.export import export_chain
from minift.pipeline.plan import make_plan, plan_text
from minift.pipeline.record import PipelineRecord, config_hash, summary_table
from minift.pipeline.spec import parse_pipeline, stage_config
from minift.train.lock import OutputDirLock
from minift.train.setup import cpu_process_group
from minift.train.stage import run_recipe

RECIPES = Path(__file__).resolve().parent
logger = logging.getLogger("pipeline")


class StageFailed(RuntimeError):
    """A stage raised: the pipeline stops there; earlier stages' outputs stay."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="the pipeline YAML file")
    parser.add_argument("--stages", nargs="+", metavar="NAME", help="run only these stages (and/or export); "
                        "the others must have finished in output_dir")
    parser.add_argument("--dry_run", action="store_true", help="check everything and print the plan; train nothing")
    parser.add_argument("--output_dir", help="overrides the file's output_dir")
    parser.add_argument("--model_name_or_path", help="overrides the file's base model")
    return parser.parse_args(argv)


def run_stage(stage, cfg, previous: Previous) -> dict:
    """The recipe's ``main``; a custom stage's also gets ``previous``."""
    return (stage.module.main(cfg, previous) if stage.takes_previous else stage.module.main(cfg)) or {}


def main(args: argparse.Namespace) -> dict:
    spec = parse_pipeline(args.config, RECIPES, model_name_or_path=args.model_name_or_path, output_dir=args.output_dir)
    for name in args.stages or []:
        if name not in spec.names and name != "export":
            raise ConfigError(f"--stages: no stage {name!r} in {spec.path}; stages: {', '.join(spec.names)}, export")
    plans = make_plan(spec)  # every stage's options, data and models checked before anything trains
    state = PartialState(cpu=cpu_process_group())  # the process group the stages' Accelerators join
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if state.is_main_process:
        print(plan_text(spec, plans), flush=True)
    if args.dry_run:
        return {"plan": plans}
    root = Path(spec.output_dir)
    lock = OutputDirLock(root).acquire() if state.is_main_process else None
    record = PipelineRecord(root, spec.path)
    chain, previous = Chain(spec.model_name_or_path), Previous()
    # Each stage's hash includes the one before it (the first: the base model's name): a stage that runs makes
    # every stage after it run too.
    upstream, changed = spec.model_name_or_path, False
    for stage in spec.stages:
        stage_dir, entry = root / stage.dir_name, record.get(stage.name)
        fixed = {"output_dir": str(stage_dir), "model_name_or_path": chain.start(stage, root, write=False)[0],
                 "init_adapter": None}
        digest = config_hash(stage_config(spec, stage, fixed), stage.recipe, stage.start_from, upstream)
        finished = entry.get("status") == "finished" and produced(stage_dir) == entry.get("produced", "missing")
        result = entry.get("result", {})  # the recorded result of a stage that does not run now
        if args.stages and stage.name not in args.stages:
            if not finished:
                raise ConfigError(f"--stages: stage {stage.index} {stage.name!r} comes first and has not finished in "
                                  f"{root}: add it to --stages")
        elif finished and entry.get("hash") == digest and not changed and not args.stages:
            logger.info("stage %d %s: finished, config unchanged: skipped", stage.index, stage.name)
        else:
            changed = True
            resume = entry.get("hash") == digest and entry.get("status") in ("running", "failed") \
                and any(stage_dir.glob("checkpoint-*"))
            if state.is_main_process:
                chain.start(stage, root, write=True)  # the combined adapter or merged model it starts from
            state.wait_for_everyone()
            model, adapter = chain.start(stage, root, write=False)
            cfg = stage_config(spec, stage, {**fixed, "model_name_or_path": model, "init_adapter": adapter,
                                             "resume_from_checkpoint": "auto" if resume else None,
                                             "overwrite_output_dir": not resume})
            previous.model_name_or_path, previous.init_adapter = model, adapter
            if state.is_main_process:
                record.set(stage.name, index=stage.index, recipe=stage.recipe, hash=digest, status="running",
                           output_dir=str(stage_dir), error=None)
            logger.info("stage %d %s (%s): %s", stage.index, stage.name, stage.recipe,
                        "resuming from its newest checkpoint" if resume else "starting")
            started = time.time()
            try:
                returned = run_stage(stage, cfg, previous)
            except Exception as err:
                if not isinstance(err, (ConfigError, FileNotFoundError)):  # a user's mistake needs no traceback
                    logger.error("stage %s failed", stage.name, exc_info=True)
                if state.is_main_process:
                    record.set(stage.name, status="failed", error=f"{type(err).__name__}: {err}")
                raise StageFailed(f"stage {stage.index} {stage.name!r} ({stage.recipe}) failed: {err}. The outputs of "
                                  f"the stages before it are kept in {root}; a re-run skips them") from err
            result = {**{k: v for k, v in returned.items() if isinstance(v, (int, float, str))},
                      "seconds": round(time.time() - started, 1)}
            if state.is_main_process:
                record.set(stage.name, status="finished", produced=produced(stage_dir), result=result)
        chain.add(stage, produced(stage_dir), stage_dir)
        previous.results[stage.name] = result
        previous.output_dirs[stage.name] = stage_dir
        upstream = digest

    if spec.export and (not args.stages or "export" in args.stages):
        digest = config_hash(spec.export, "export", "", upstream)
        entry = record.get("export")
        if entry.get("status") == "finished" and entry.get("hash") == digest and not changed and not args.stages:
            logger.info("export: finished, unchanged: skipped")
        elif state.is_main_process:
            record.set("export", hash=digest, status="running")
            record.set("export", status="finished", outputs=export_chain(chain, spec.export, root / "export"))
        state.wait_for_everyone()
    if state.is_main_process:
        rows = [(s.name, record.get(s.name).get("status", "not run"), record.get(s.name).get("result", {}))
                for s in spec.stages]
        table = summary_table(rows)
        (root / "summary.md").write_text(f"# Pipeline {spec.path}\n\n{table}")
        print(f"\n{table}\nrecord: {record.path}; summary: {root / 'summary.md'}"
              + (f"; export: {root / 'export'}" if spec.export else ""), flush=True)
        lock.release()
    return {"stages": previous.results, "record": record.data}


if __name__ == "__main__":
    run_recipe(main, None, __doc__, errors=(StageFailed,), parse=parse_args)
