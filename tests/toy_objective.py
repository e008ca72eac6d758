"""A new objective on the stage kit, as a user would write one: its config, its data, its step.

Each training sequence counts upwards from a start token drawn from the sequence's own seed (data made
during training, as rollouts are); the loss is the mean per-token NLL of each sequence. tests/test_stage.py
runs it killed and resumed, and with two processes.
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch

from minift.sections import TrainConfig
from minift.train.forward import SequenceLogprobs
from minift.train.stage import Stage, run_recipe


@dataclass
class ToyConfig(TrainConfig):
    output_dir: str = "out/toy"
    max_steps: int = 16
    per_device_train_batch_size: int = 4
    lora_dropout: float = 0.1
    logging_steps: int = 1
    seq_len: int = field(default=48, metadata={"help": "tokens per sequence"})
    step_sleep: float = field(default=0.0, metadata={"help": "seconds to pause after each step (for kill tests)",
                                                        "resumable": True})


def main(cfg: ToyConfig) -> dict:
    stage = Stage(cfg, "toy", unit="sequences")
    accelerator, vocab = stage.accelerator, len(stage.load_tokenizer())
    model = stage.load_model()

    def make_batch(prompts: list, seeds: list[int], refill) -> dict:
        starts = [int(torch.randint(3, vocab, (), generator=torch.Generator().manual_seed(s))) for s in seeds]
        ids = torch.stack([(s + torch.arange(cfg.seq_len)) % (vocab - 3) + 3 for s in starts])
        return {"input_ids": ids, "labels": ids.clone()}

    logps_model = stage.prepare(SequenceLogprobs(model), stage.online_batches(list(range(64)), make_batch))
    stage.resume()
    world = accelerator.num_processes
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    for window in stage.steps():
        total = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(window):
            with contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(logps_model):
                logps, counts = logps_model(**batch)
                loss = -(logps / counts).sum()
                accelerator.backward(loss * world / per_step)
            total += loss.detach()
        mean = accelerator.reduce(total, "sum").item() / per_step
        stage.update(mean, {"loss": mean}, units=per_step)
        time.sleep(cfg.step_sleep)
    return stage.finish()


if __name__ == "__main__":
    run_recipe(main, ToyConfig, __doc__)
