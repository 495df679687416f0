"""Rebirth tuning: caption the training videos with the final mrDPO model, then SFT the PRE-DPO model
on those captions mixed with its original non-caption data (config ratio); evaluate before / after.

Resumable like mrDPO: the captions and the mixed records are written once (`workdir/captions.jsonl`,
`workdir/records.jsonl`), the SFT steps are run_stage checkpoints, evaluations are JSON files.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vsalmonn_jax.atomic_file import write_json
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.pairs import MEDIA_FIELDS, Sample, judged_text
from vsalmonn_jax.training.policy_env import process_batches


def caption_records(items: Sequence[Mapping], captions: Sequence[Sample], default_prompt: str
                    ) -> tuple[list[dict], list[str]]:
    """SFT records "prompt -> the mrDPO model's caption" per video; (records, ids skipped because
    the caption came out empty). A caption without an end token is kept with its repeats collapsed."""
    if len(items) != len(captions):
        raise ValueError(f"caption_records: {len(items)} videos but {len(captions)} captions")
    records, skipped = [], []
    for item, sample in zip(items, captions, strict=True):
        text = judged_text(sample).strip()
        if not text:
            skipped.append(str(item.get("id", "")))
            continue
        record = {k: item[k] for k in MEDIA_FIELDS if item.get(k) is not None}
        record.update(id=f"{item.get('id', '')}:rebirth", video_id=str(item.get("id", "")),
                      conversations=[
            {"role": "user", "content": item.get("prompt") or default_prompt},
            {"role": "assistant", "content": text}])
        records.append(record)
    return records, skipped


def mix_records(caption_recs: Sequence[Mapping], non_caption: Sequence[Mapping], ratio: float,
                seed: int) -> list[dict]:
    """Captions + non-caption records so that non-caption records are `ratio` of the mix.

    n_non = round(ratio / (1 - ratio) * n_captions), drawn from `non_caption` without replacement
    when it is large enough (with replacement otherwise), seeded; the mix is shuffled.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"rebirth.non_caption_ratio must be in [0, 1), got {ratio}")
    rng = np.random.default_rng([int(seed), 0x5EB])
    count = int(round(ratio / (1.0 - ratio) * len(caption_recs))) if ratio > 0 else 0
    if ratio > 0 and not non_caption:
        raise ValueError(f"rebirth.non_caption_ratio={ratio} needs non-caption records (e.g. the SFT "
                         "stage's QA conversations), but none were given")
    if count:
        pick = rng.choice(len(non_caption), size=count, replace=count > len(non_caption))
        extra = [dict(non_caption[int(i)]) for i in pick]
    else:
        extra = []
    mixed = [dict(r) for r in caption_recs] + extra
    order = rng.permutation(len(mixed))
    return [mixed[int(i)] for i in order]


def rebirth_config(config, records: int = 0, rows_per_step: int = 1):
    """The run_stage config: stage rebirth (SFT objective) for rebirth.num_steps steps; 0 = train.epochs
    passes over the `records` rebirth records when train.epochs > 0 (the 7B preset: 1), else
    train.num_steps."""
    cfg = config.copy_and_resolve_references()
    cfg.stage = "rebirth"
    steps = int(config.rebirth.get("num_steps", 0)) or (
        st.steps_for_epochs(config.train, records, rows_per_step) if records else None)
    if steps:
        cfg.train.num_steps = steps
    return cfg


def _load_or(path: pathlib.Path, build: Callable[[], Any]):
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    value = build()
    if jax.process_index() == 0:
        write_json(path, value, default=float)
    return value


def run_rebirth(config, env, workdir: str | os.PathLike, *, pre_dpo_state: st.TrainState,
                final_state: st.TrainState, train_items: Sequence[Mapping],
                non_caption_records: Sequence[Mapping] = (),
                eval_fn: Callable[[st.TrainState], dict] | None = None, mesh=None,
                progress: bool = False, tensorboard: bool = False) -> tuple[st.TrainState, dict]:
    """Caption `train_items` greedily with `final_state` (the mrDPO model), mix with
    `non_caption_records` (SFT conversations, e.g. QA) at `rebirth.non_caption_ratio`, and SFT
    `pre_dpo_state` on the mix for rebirth.num_steps (0 = train.num_steps).

    eval_fn(state) -> dict runs on the pre-DPO model ("before") and the reborn one ("after").
    `pre_dpo_state` is consumed (its buffers are donated to the steps). Returns (state, summary)
    with summary = {"before", "after", "records", "captions", "skipped_empty", "preempted"}.
    """
    from vsalmonn_jax.training.loop import run_stage

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    default_prompt = str(config.generate.prompt)
    items = list(train_items)

    def caption():
        samples = env.generate(final_state, items, sampling=SamplingConfig(greedy=True),
                               rng=jax.random.PRNGKey(0),
                               max_new_tokens=int(config.generate.max_new_tokens))
        return [s.to_dict() for s in samples]

    captions = [Sample(**c) for c in _load_or(workdir / "captions.json", caption)]

    def records():
        recs, skipped = caption_records(items, captions, default_prompt)
        mixed = mix_records(recs, list(non_caption_records),
                            float(config.rebirth.non_caption_ratio), int(config.seed))
        return {"records": mixed, "captions": len(recs), "skipped_empty": skipped}

    built = _load_or(workdir / "records.json", records)
    if not built["captions"]:
        raise RuntimeError(f"rebirth: the final model's captions of all {len(items)} training videos "
                           f"came out empty (ids {built['skipped_empty'][:5]}...): nothing to tune on")
    before = _load_or(workdir / "eval_before.json",
                      lambda: eval_fn(pre_dpo_state) if eval_fn is not None else {})
    from vsalmonn_jax.training.mrdpo import global_batch
    from vsalmonn_jax.training.sharding import make_mesh

    mesh = mesh or make_mesh(dict(config.mesh))
    rows = global_batch(config, mesh)
    cfg = rebirth_config(config, len(built["records"]), rows)
    # the base is the pre-DPO model (its LoRA merged): saved with the checkpoints, so caption and
    # export read it instead of rebuilding the seed's
    with process_batches(env, built["records"], mesh, rows,
                         seed=int(config.data.shuffle_seed)) as ahead:
        state, result = run_stage(cfg, ahead, workdir, task=env.task, state=pre_dpo_state,
                                  mesh=mesh, progress=progress, tensorboard=tensorboard,
                                  include_params=True)
    summary = {"preempted": result["preempted"], "signal": result["signal"], "step": result["step"],
               "records": len(built["records"]),
               "captions": built["captions"], "skipped_empty": built["skipped_empty"],
               "before": before, "last_step": result["last"]}
    if result["preempted"]:
        return state, summary
    summary["after"] = _load_or(workdir / "eval_after.json",
                                lambda: eval_fn(state) if eval_fn is not None else {})
    return state, summary


def _mrdpo_rounds(source: pathlib.Path, config) -> int:
    """The rounds the mrDPO run in `source` was started for: its config.json (written by `train`),
    else this config's mrdpo.rounds."""
    try:
        saved = json.loads((source / "config.json").read_text(encoding="utf-8"))
        return int(saved["mrdpo"]["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(config.mrdpo.rounds)


def run_from_config(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """The rebirth stage of a real run (AV model), for `vsalmonn-jax train --config.stage=rebirth`
    with `rebirth.mrdpo_workdir` set: its round 0 (pre-DPO model) is tuned on captions of the
    `data.train` caption records by its last round (the final model), mixed with the SFT records of
    `rebirth.non_caption_data`; `data.val` caption records are judged before and after."""
    from vsalmonn_jax.data.records import load_records
    from vsalmonn_jax.data.text import load_tokenizer
    from vsalmonn_jax.eval import get_judge
    from vsalmonn_jax.training.mrdpo import evaluate_captions
    from vsalmonn_jax.training.policy_env import AVPolicyEnv
    from vsalmonn_jax.training.round_store import RoundCheckpoints, load_round_state
    from vsalmonn_jax.training.sharding import make_mesh
    from vsalmonn_jax.training.task import build_task

    source = pathlib.Path(str(config.rebirth.mrdpo_workdir))
    if not str(config.rebirth.mrdpo_workdir) or not (source / "rounds").is_dir():
        raise ValueError(f"rebirth needs --config.rebirth.mrdpo_workdir=DIR of a finished mrDPO run "
                         f"(with rounds/), got {str(config.rebirth.mrdpo_workdir)!r}")
    if not config.data.tokenizer or not config.data.train:
        raise ValueError("rebirth needs --config.data.tokenizer=DIR and --config.data.train="
                         "CAPTIONS.jsonl (the training videos to caption)")
    ckpts = RoundCheckpoints(source / "rounds")
    try:
        last = ckpts.latest()
    finally:
        ckpts.close()
    rounds = _mrdpo_rounds(source, config)
    if last is None or last < rounds:   # rounds/<R> is the final model, saved after the last round
        raise ValueError(f"rebirth: the mrDPO run {source} has finished {last or 0} of its {rounds} "
                         "rounds (stopped or still running): resume it (the same train command) "
                         "until it ends, then start rebirth")
    task = build_task(config)
    mesh = make_mesh(dict(config.mesh))
    cfg = rebirth_config(config)
    tx, _ = st.make_optimizer(cfg.train, 1)
    pre, _ = load_round_state(source, 0, st.abstract_state(task, cfg, tx, mesh))
    final, _ = load_round_state(source, last, st.abstract_state(task, cfg, tx, mesh))
    tokenizer = load_tokenizer(config.data.tokenizer, config.model.connector.placeholder_token)
    env = AVPolicyEnv(config, task, tokenizer, mesh=mesh, sample_batch=int(config.mrdpo.sample_batch))
    root = config.data.root or None
    train = load_records(str(config.data.train), kind="caption", root=root)
    extra = (load_records(str(config.rebirth.non_caption_data), kind="sft", root=root)
             if config.rebirth.non_caption_data else [])
    val = load_records(str(config.data.val), kind="caption", root=root) if config.data.val else []
    judge = get_judge(str(config.mrdpo.judge), config)
    eval_fn = None
    if val:
        def eval_fn(state):
            return evaluate_captions(env, state, val, judge,
                                     max_new_tokens=int(config.generate.max_new_tokens))
    _, summary = run_rebirth(config, env, workdir, pre_dpo_state=pre, final_state=final,
                             train_items=train, non_caption_records=extra, eval_fn=eval_fn,
                             mesh=mesh, progress=progress, tensorboard=True)
    return summary
