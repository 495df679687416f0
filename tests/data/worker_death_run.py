"""Subprocess entry for test_worker_death.py: the real training loop (run_stage, tiny text-only model)
fed by the real grain loader with 2 worker processes decoding the synthetic data set's media.

usage: python worker_death_run.py DATA_DIR WORKDIR
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
LENGTH = 32


class TextOnly:
    """Batches of the media pipeline cut to their first LENGTH tokens for the text-only model (one
    compiled shape); the data position (get_state / set_state) is the pipeline's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        ids = batch["input_ids"][:, :LENGTH]
        mask = batch["attention_mask"][:, :LENGTH].astype(bool)
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask,
                "example_id": batch["example_id"]}

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


def main(data: str, workdir: str) -> int:
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.data.pipeline import make_loader
    from vsalmonn_jax.data.records import load_records
    from vsalmonn_jax.data.worker_watch import WorkerDied
    from vsalmonn_jax.training.loop import run_stage
    from vsalmonn_jax.training.task import build_task

    config = load_config("tiny_sft", [f"data.tokenizer={data}/tokenizer", f"data.root={data}",
                                      f"workdir={workdir}", "data.num_workers=2", "data.batch_size=1",
                                      "train.num_steps=100000",
                                      "train.checkpoint_every=100000", "train.log_every=1"])
    records = load_records(f"{data}/sft_train.jsonl", root=data)
    loader = make_loader(records, config, shard=(0, 1), num_epochs=None, drop_remainder=True)
    try:
        _, summary = run_stage(config, TextOnly(loader), workdir,
                               task=build_task(config, text_only=True), progress=False,
                               tensorboard=False)
    except WorkerDied as err:
        print(f"stopped: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        loader.close()
    print(f"preempted={summary['preempted']} step={summary['step']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
