"""`vsalmonn-jax train`: run one stage (align | sft | dpo | mrdpo | rebirth) of a config.

align / sft / dpo (and rebirth without `rebirth.mrdpo_workdir`) run the engine's loop; mrdpo runs the
round driver (training/mrdpo.py) and rebirth with `rebirth.mrdpo_workdir` the rebirth driver.

Data: `--config.data.train=PATH.jsonl` goes through the data pipeline (AV model, media decoded in
workers); `--config.data.train=synthetic[:N]` trains the text-only model on N synthetic token
sequences (SFT) or pairs (DPO), no tokenizer needed (tests, smoke runs). Resumes from
`<workdir>/checkpoints` when present; `--init-from DIR` starts from another stage's trainables.
The config is validated first (config_check.py); `<workdir>/config.json` is written once and a resume
that changes weight-affecting settings is refused unless `--allow-config-change` (run_config.py).
SIGTERM / Ctrl-C save and stop (exit status 0 / 130); a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

SYNTHETIC_LENGTH = 32


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vsalmonn-jax train", description=__doc__.splitlines()[0],
        epilog="config: --config configs/X.py --config.stage=sft --config.train.lr=1e-4 ...")
    p.add_argument("--workdir", default="", help="output folder (default: config.workdir)")
    p.add_argument("--init-from", default="",
                   help="a previous stage's workdir: start from its latest trainables")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although settings that affect the trained weights changed (the "
                        "change is recorded in config.json; by default such a resume is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _local_batch(config) -> int:
    """Rows per host per step: data.batch_size per (data x fsdp) shard of this host's devices."""
    from vsalmonn_jax.distributed import local_batch_shards
    from vsalmonn_jax.training.sharding import make_mesh

    return int(config.data.batch_size) * local_batch_shards(make_mesh(dict(config.mesh)))


def synthetic_iterator(config, spec: str, batch: int):
    """`synthetic` or `synthetic:N` -> a resumable iterator of text-only batches for the stage."""
    from vsalmonn_jax.training import synthetic
    from vsalmonn_jax.training.steps import objective_of

    _, _, count = spec.partition(":")
    num = int(count) if count else max(64, batch)
    vocab = int(config.model.llm.vocab_size)
    seed = int(config.data.shuffle_seed)
    if objective_of(config.stage) == "dpo":
        data = synthetic.dpo_examples(num, vocab, SYNTHETIC_LENGTH, seed)
    else:
        data = synthetic.sft_examples(num, vocab, SYNTHETIC_LENGTH, seed)
    return synthetic.ArrayIterator(data, batch, seed=seed)


def pipeline_iterator(config, path: str, batch: int, shuffle: bool = True, epochs: int | None = None):
    """JSONL records -> the data pipeline's resumable BatchIterator (endless unless `epochs`; a
    finite pass keeps its short last batch, which evaluation pads)."""
    from vsalmonn_jax.data.pipeline import make_loader
    from vsalmonn_jax.data.records import load_records

    records = load_records(path, root=config.data.root or None)
    return make_loader(records, config, shuffle=shuffle, num_epochs=epochs, batch_size=batch,
                       drop_remainder=epochs is None)


def _read_records(path: str, config) -> tuple[str, int]:
    """(why the training JSONL cannot train anything, "" when it can; its record count): read
    before any model is built."""
    from vsalmonn_jax.data.records import RecordError, load_records

    try:
        records = load_records(path, root=config.data.root or None)
    except RecordError as err:
        return str(err), 0
    if not records:
        return (f"{path}: holds no records (empty file): nothing to train on "
                "(check it with `vsalmonn-jax data check`)"), 0
    if config.stage in ("mrdpo", "rebirth"):       # the round judge must read the ground truth
        from vsalmonn_jax.training.pairs import check_gt_captions, check_judgeable

        try:
            check_judgeable(records, str(config.mrdpo.judge))
            if config.stage == "mrdpo":
                check_gt_captions(records, config)
        except ValueError as err:
            return str(err), len(records)
    return "", len(records)


def _apply_epochs(config, records: int) -> None:
    """train.epochs > 0 (the 7B presets: SFT 5, DPO 3, rebirth 1, as the release): num_steps =
    that many passes over the records at the global batch; said on stderr, recorded in config.json."""
    from vsalmonn_jax.training.mrdpo import global_batch
    from vsalmonn_jax.training.sharding import make_mesh
    from vsalmonn_jax.training.state import steps_for_epochs

    rows = global_batch(config, make_mesh(dict(config.mesh)))
    steps = steps_for_epochs(config.train, records, rows)
    if steps is None:
        return
    config.train.num_steps = steps
    print(f"vsalmonn-jax train: train.epochs={int(config.train.epochs)} over {records:,} records at "
          f"{rows} rows per step: train.num_steps={steps} (train.epochs=0 uses train.num_steps)",
          file=sys.stderr)


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import load_config, split_config_args
    from vsalmonn_jax.config_check import accumulation_problems, check_for_cli

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    if not config_path:
        print("vsalmonn-jax train: --config configs/X.py is required", file=sys.stderr)
        return 2
    config = load_config(config_path, overrides)
    if args.workdir:
        config.workdir = args.workdir   # checked with the rest of the config (config_check)
    from vsalmonn_jax.models.pretrained import resolve_tokenizer

    resolve_tokenizer(config)  # data.tokenizer empty: the one beside model.pretrained's weights
    spec = str(config.data.train)
    if not spec:
        print("vsalmonn-jax train: set --config.data.train=PATH.jsonl (records) or =synthetic[:N]",
              file=sys.stderr)
        return 2
    if check_for_cli("vsalmonn-jax train", config, needs_tokenizer=not spec.startswith("synthetic")):
        return 2
    for problem in accumulation_problems(config):
        print(f"vsalmonn-jax train: invalid config: {problem}", file=sys.stderr)
        return 2
    round_driven = config.stage == "mrdpo" or (config.stage == "rebirth" and config.rebirth.mrdpo_workdir)
    if round_driven and spec.startswith("synthetic"):
        print(f"vsalmonn-jax train: stage {config.stage} samples captions of real caption records: "
              "set --config.data.train=PATH.jsonl (id, video/audio, events)", file=sys.stderr)
        return 2
    if not spec.startswith("synthetic"):
        problem, records = _read_records(spec, config)
        if problem:
            print(f"vsalmonn-jax train: {problem}", file=sys.stderr)
            return 2
        if not round_driven:   # mrDPO: mrdpo.steps_per_round; rebirth counts its own records
            _apply_epochs(config, records)
    if args.init_from and not _has_checkpoint(pathlib.Path(args.init_from)):
        print(f"vsalmonn-jax train: --init-from {args.init_from}: no checkpoint there (expected "
              f"{pathlib.Path(args.init_from) / 'checkpoints'}/<step>/); pass the workdir of a "
              "finished stage", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir or config.workdir)
    config.workdir = str(workdir)   # quarantine and config.json follow --workdir
    from vsalmonn_jax.distributed import ensure_shared_directory

    try:   # several processes: before anything reads a checkpoint or a round folder
        for folder in (workdir, *([args.init_from] if args.init_from else [])):
            ensure_shared_directory(folder)
    except RuntimeError as err:
        print(f"vsalmonn-jax train: {err}", file=sys.stderr)
        return 2
    from vsalmonn_jax.training.run_config import write_run_config

    try:
        changes = write_run_config(workdir, config, allow_change=args.allow_config_change)
    except ValueError as err:   # ConfigChangedError, unreadable config.json
        print(f"vsalmonn-jax train: {err}", file=sys.stderr)
        return 2
    if changes:
        print("vsalmonn-jax train: resuming with changed settings: "
              + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()), file=sys.stderr)
    from vsalmonn_jax.generate.run_dir import save_tokenizer

    save_tokenizer(config, workdir)   # the run carries its tokenizer (caption / export read it)
    try:
        return _run(config, args, spec, workdir, round_driven)
    except _run_errors() as err:
        print(f"vsalmonn-jax train: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _run_errors() -> tuple[type[Exception], ...]:
    """Errors that end a run with a message (no traceback): each names the file / step / fix."""
    from vsalmonn_jax.data.pipeline import DataPositionError
    from vsalmonn_jax.data.quarantine import TooManyFailures
    from vsalmonn_jax.data.worker_watch import WorkerDied
    from vsalmonn_jax.training.checkpoint import CheckpointError
    from vsalmonn_jax.training.loop import NonFiniteLossError

    return WorkerDied, CheckpointError, TooManyFailures, NonFiniteLossError, DataPositionError


def _has_checkpoint(run: pathlib.Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _run(config, args, spec: str, workdir: pathlib.Path, round_driven: bool) -> int:
    if round_driven:
        from vsalmonn_jax.training import mrdpo_run, rebirth

        if config.stage == "mrdpo":
            summary = mrdpo_run.run_from_config(config, workdir, init_from=args.init_from,
                                                progress=not args.no_progress)
        else:
            summary = rebirth.run_from_config(config, workdir, progress=not args.no_progress)
        print(json.dumps(summary, default=float))
        return _stopped(summary, f"round {summary.get('round')} " if "round" in summary else "")

    from vsalmonn_jax.training import loop
    from vsalmonn_jax.training.task import build_task

    batch = _local_batch(config)
    text_only = spec.startswith("synthetic")
    task = build_task(config, text_only=text_only)
    if text_only:
        train_iter = synthetic_iterator(config, spec, batch)
        eval_batches = None
    else:
        train_iter = pipeline_iterator(config, spec, batch)
        eval_batches = ((lambda: pipeline_iterator(config, config.data.val, batch, shuffle=False,
                                                   epochs=1)) if config.data.val else None)
    eval_fn = None
    if eval_batches is not None:
        eval_fn = lambda state, steps: loop.evaluate(steps, state, eval_batches())
    # a DPO stage folds the previous LoRA into its base: save that base with its checkpoints, or
    # a resume, `caption` and `export` would rebuild the unmerged one
    merged = bool(args.init_from) and _merges_base(config, task)
    try:
        if args.init_from:   # a base that came with it (a DPO run's) is saved with this stage's
            state, with_base = _init_from(config, task, pathlib.Path(args.init_from), workdir)
            merged = merged or with_base
        elif _merges_base(config, task):   # pretrained weights with a LoRA (an SFT checkpoint)
            state, merged = _dpo_start(config, task, workdir)
        else:
            state = None
        state, summary = loop.run_stage(config, train_iter, workdir, task=task, state=state,
                                        eval_fn=eval_fn, progress=not args.no_progress,
                                        include_params=merged)
    finally:
        if hasattr(train_iter, "close"):   # stop data workers (a dead one: the others are killed)
            train_iter.close()
    report = {k: summary[k] for k in ("step", "skipped_steps", "preempted", "checkpoint", "last")}
    print(json.dumps(report, default=float))
    return _stopped(summary, "", f"; checkpoint {summary['checkpoint']}")


def _stopped(summary: dict, where: str, saved: str = "") -> int:
    """The exit code of a finished or stopped stage (0; 130 after Ctrl-C), saying how to resume."""
    if not summary.get("preempted"):
        return 0
    signal = summary.get("signal") or "SIGTERM"
    print(f"vsalmonn-jax train: stopped by {signal} at {where}step {summary.get('step')}{saved}; "
          "run the same command to resume", file=sys.stderr)
    return 130 if signal == "SIGINT" else 0


def _dpo_start(config, task, workdir: pathlib.Path):
    """(initial state or None, whether checkpoints hold the base) of a DPO stage without
    --init-from. Pretrained weights that bring a LoRA (e.g. the release's SFT checkpoint-N.bin):
    that LoRA is merged into the base and a fresh one trained, as the release's DPO does
    (--merge_and_new_lora), so the reference is the SFT model; the base is then saved with the
    checkpoints. A resume: (None, whether its checkpoints hold a base)."""
    from vsalmonn_jax.distributed import primary_value
    from vsalmonn_jax.models.pretrained import write_record
    from vsalmonn_jax.training.checkpoint import Checkpointer

    if primary_value(_has_checkpoint(workdir)):   # every process takes the same branch
        ckpt = Checkpointer(workdir / "checkpoints", create=False)
        try:
            return None, ckpt.holds_base()
        finally:
            ckpt.close()
    state, record = _fresh_state(config, task)
    if not record.get("lora_loaded"):
        write_record(workdir, record)
        return state, False
    write_record(workdir, dict(record, lora="the pretrained LoRA merged into the base, a fresh "
                               "LoRA trained (the release's merge_and_new_lora)"))
    return _merge_lora(config, task, state), True


def _fresh_state(config, task):
    """(state, pretrained record) from the cached initializer run_stage uses next (compiled once)."""
    import jax

    from vsalmonn_jax.training.loop import compiled_steps
    from vsalmonn_jax.training.sharding import make_mesh

    _, _, _, _, init = compiled_steps(task, config, int(config.train.num_steps),
                                      make_mesh(dict(config.mesh)))
    return init(jax.random.PRNGKey(int(config.seed))), init.record


def _merge_lora(config, task, state):
    """The LoRA folded into the base and a fresh one started: a DPO stage's reference is then the
    model it starts from."""
    import jax

    from vsalmonn_jax.training import state as st

    return st.merge_and_reinit(state, task.lora_config, jax.random.PRNGKey(int(config.seed) + 1))


def _merges_base(config, task) -> bool:
    from vsalmonn_jax.training.steps import objective_of

    return objective_of(config.stage) == "dpo" and task.lora_config is not None


def _init_from(config, task, previous: pathlib.Path, workdir: pathlib.Path):
    """(state, whether its base came from `previous`): a fresh state for this stage (base from
    config.model.pretrained, recorded in the run's config.json) whose trainables come from
    `previous`'s latest checkpoint, with the base saved there when it has one (a DPO run's)."""
    from vsalmonn_jax.models.pretrained import write_record
    from vsalmonn_jax.training.checkpoint import restore_init_from

    fresh, record = _fresh_state(config, task)
    state, with_base = restore_init_from(previous, fresh)
    record = dict(record, trainables=f"from {previous}")
    if with_base:   # e.g. a DPO run: its LoRA was trained on its saved (merged) base
        record["base"] = f"the base saved with {previous}'s checkpoint"
    write_record(workdir, record)
    if _merges_base(config, task) and "lora" in state.trainable:
        state = _merge_lora(config, task, state)   # the reference: the previous stage's model
    return state, with_base
