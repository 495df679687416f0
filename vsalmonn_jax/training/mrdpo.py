"""Multi-round DPO (the paper's mrDPO): sample -> judge -> pair -> DPO round -> merge LoRA -> evaluate.

Each round: k captions per training video from the current policy (top-p sampling), scored against
the ground-truth events by the configured judge, paired by the configured rule (training/pairs.py);
the reference is fixed within a round (the policy it starts from), so its log-probs are computed
once with the pairs and stored (dpo.precompute_reference, training/round_reference.py; the step
then runs no reference forward); `steps_per_round` DPO steps (+ GT-caption CE) via `run_stage`;
then the LoRA is merged into the base (jitted, donated), a fresh LoRA is drawn (B = 0), so the next
round's reference (LoRA off + round-start adapter snapshot) is the policy just trained, and the
optimizer and schedule restart. The held-out split is evaluated after every round.

Resumable: the round-start state (merged base, trainables, rng) and the cursor + per-round metrics
are an orbax checkpoint per round (`workdir/rounds`, training/round_store.py), the round's pairs and
reference log-probs JSONL files, and the round's steps are run_stage checkpoints
(`workdir/round_<r>/checkpoints`): a run killed anywhere resumes where it stopped and ends with the
same trainables and metrics as an uninterrupted run. A real run's entry: training/mrdpo_run.py.

Layout of `workdir`:
  rounds/<r>/                 round r's start state + cursor/history (orbax; r = rounds: final)
  round_<r>/pairs.jsonl       preference (+ CE-only) records of round r
  round_<r>/reference.jsonl   their reference log-probs (one row per pair: index, id, values)
  round_<r>/samples.jsonl     every sampled caption with its judged counts
  round_<r>/checkpoints/      run_stage checkpoints of the round's DPO steps; metrics.jsonl
  round_<r>/first_step.json   metrics of the round's first step (DPO loss log 2: policy == reference)
  mrdpo.json                  the cursor and history, human-readable copy
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vsalmonn_jax.atomic_file import write_json, write_jsonl
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.lora import LoraConfig
from vsalmonn_jax.training import pairs as pairs_lib
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.pairs import PairRule, Sample
from vsalmonn_jax.training.policy_env import process_batches
from vsalmonn_jax.training.round_reference import REFERENCE_FILE, round_reference
from vsalmonn_jax.training.round_store import (  # noqa: F401  (re-exported: rebirth, demo, tests)
    RoundCheckpoints,
    load_round_state,
    read_jsonl,
)
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, make_mesh

TIMING_FIELDS = ("tokens_per_s",)   # wall-clock numbers are left out of the (reproducible) history


@dataclasses.dataclass(frozen=True)
class MrdpoOptions:
    """The `mrdpo` config section, read once (see defaults.py for every field)."""

    rounds: int = 3
    steps_per_round: int = 1000
    samples_per_video: int = 2
    videos_per_round: int = 0          # 0 = every training item each round; else a fresh slice
    sampling: SamplingConfig = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9)
    max_new_tokens: int = 1024
    judge: str = "exact"
    batch_size: int = 0                # pairs per step over the whole mesh; 0 = global_batch()
    precompute_reference: bool = True  # reference log-probs once per round (round_reference.py)
    control: bool = False              # control arm: DPO term off (CE on the GT captions only)
    gt_guidance: bool = True           # pair records carry the GT caption for the CE term
    ce_only_records: bool = False      # videos without a pair still give a GT-only record
    unfinished: str = "collapsed"      # a rejected sample that never stopped: pairs.UNFINISHED
    eval_max_new_tokens: int = 1024

    @classmethod
    def from_config(cls, config) -> MrdpoOptions:
        m = config.mrdpo
        max_new = int(m.get("max_new_tokens", 0)) or int(config.generate.max_new_tokens)
        return cls(
            rounds=int(m.rounds), steps_per_round=int(m.steps_per_round),
            samples_per_video=int(m.samples_per_video),
            videos_per_round=int(m.get("videos_per_round", 0)),
            sampling=SamplingConfig(greedy=False, temperature=float(m.get("temperature", 1.0)),
                                    top_k=int(m.get("top_k", 0)), top_p=float(m.get("top_p", 0.9)),
                                    repetition_penalty=float(config.generate.get("repetition_penalty", 1.0))),
            max_new_tokens=max_new, judge=str(m.judge),
            batch_size=int(m.get("batch_size", 0)),
            precompute_reference=bool(config.dpo.precompute_reference),
            control=bool(m.get("control", False)), gt_guidance=bool(m.get("gt_guidance", True)),
            ce_only_records=bool(m.get("ce_only_records", False)),
            unfinished=str(m.get("unfinished", "collapsed")),
            eval_max_new_tokens=int(config.generate.max_new_tokens))


# ------------------------------------------------------------------------------ merge boundary

def merge_round(state: st.TrainState, lora_config: LoraConfig, rng: jax.Array, shardings=None,
                mesh=None, rules=LOGICAL_AXIS_RULES) -> st.TrainState:
    """Round boundary: base <- W + scale A B, LoRA <- fresh (B = 0), jitted with the old base donated
    (training/state.py merge_and_reinit). The policy is unchanged (up to the base dtype's rounding:
    see merge_and_reinit); the optimizer state and the
    reference snapshot are left to the next stage's `prepare_state` (fresh optimizer, adapter
    snapshot), so the next round's reference is the policy just trained."""
    if "lora" not in state.trainable:
        raise ValueError("merge_round: the state has no 'lora' trainable (train.trainable lacks 'lora')")
    if mesh is None:
        return st.merge_and_reinit(state, lora_config, rng, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return st.merge_and_reinit(state, lora_config, rng, shardings)


# ------------------------------------------------------------------------------ one round's data

def round_items(items: Sequence[Mapping], round_index: int, per_round: int) -> list[Mapping]:
    """The videos sampled in round r: all of them, or the r-th slice of `per_round` (cycling)."""
    items = list(items)
    if per_round <= 0 or per_round >= len(items):
        return items
    start = (round_index * per_round) % len(items)
    return [items[(start + i) % len(items)] for i in range(per_round)]


def global_batch(config, mesh, batch_size: int = 0) -> int:
    """Rows per step over the mesh: `batch_size` when given, else data.batch_size per (data x fsdp)
    shard (the train CLI's convention). One host builds whole batches (single-process runs)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = int(batch_size) or int(config.data.batch_size) * shards
    if rows % shards:
        raise ValueError(f"batch of {rows} rows does not divide over data x fsdp = {shards} shards")
    return rows


def sample_captions(env, state, items: Sequence[Mapping], opts: MrdpoOptions,
                    rng: jax.Array) -> list[list[Sample]]:
    """k sampled captions per item [video][k] from the current policy (top-p, temperature)."""
    k = opts.samples_per_video
    if k < 2 and not opts.control:
        raise ValueError(f"mrdpo.samples_per_video must be >= 2 to form pairs, got {k}")
    repeated = [item for _ in range(k) for item in items]   # sample j of item i at row j * n + i
    flat = env.generate(state, repeated, sampling=opts.sampling, rng=rng,
                        max_new_tokens=opts.max_new_tokens)
    n = len(items)
    return [[flat[j * n + i] for j in range(k)] for i in range(n)]


def make_round_records(env, state, items: Sequence[Mapping], judge, rule: PairRule,
                       opts: MrdpoOptions, rng: jax.Array, default_prompt: str
                       ) -> tuple[list[dict], list[dict], dict]:
    """(training records, sample log rows, stats) of one round.

    DPO: preference records (chosen, rejected, gt). Control arm: SFT records on the GT captions of
    the same videos (the CE term alone), so both arms see the same videos and steps.
    """
    samples = sample_captions(env, state, items, opts, rng)
    scores = pairs_lib.score_samples(judge, items, samples)
    records = pairs_lib.build_pairs(items, samples, scores, rule, default_prompt=default_prompt,
                                    gt=opts.gt_guidance, ce_only_records=opts.ce_only_records,
                                    unfinished=opts.unfinished)
    stats = pairs_lib.pair_stats(items, samples, scores, records)
    if opts.control:
        records = control_records(items, default_prompt)
        stats["control_records"] = len(records)
    log = [{"video_id": str(item.get("id", "")), "sample": j, **sample.to_dict(),
            "score": pairs_lib.score_counts(score), "error": rule.error(score)}
           for item, row, row_scores in zip(items, samples, scores, strict=True)
           for j, (sample, score) in enumerate(zip(row, row_scores, strict=True))]
    return records, log, stats


def control_records(items: Sequence[Mapping], default_prompt: str) -> list[dict]:
    """SFT records "prompt -> ground-truth caption" (the control arm's CE-only training data)."""
    out = []
    for item in items:
        truth = pairs_lib.gt_caption(item)
        if truth is None:
            continue
        record = {k: item[k] for k in pairs_lib.MEDIA_FIELDS if item.get(k) is not None}
        record.update(id=f"{item.get('id', '')}:gt", video_id=str(item.get("id", "")), conversations=[
            {"role": "user", "content": item.get("prompt") or default_prompt},
            {"role": "assistant", "content": truth}])
        out.append(record)
    return out


# ------------------------------------------------------------------------------ evaluation

def evaluate_captions(env, state, items: Sequence[Mapping], judge, *, max_new_tokens: int,
                      rng: jax.Array | None = None) -> dict:
    """Greedy captions of `items`, judged: micro Miss / Incorrect / Hallucination / Total, repetition.

    Returns {"miss", "incorrect", "hallucination", "total", "seq_rep_4", "no_end_token_rate",
    "videos", "failed", "captions": [...]} (floats, plus the captions for the report).
    """
    from vsalmonn_jax.eval import aggregate, repetition_stats

    rng = jax.random.PRNGKey(0) if rng is None else rng
    samples = env.generate(state, list(items), sampling=SamplingConfig(greedy=True), rng=rng,
                           max_new_tokens=max_new_tokens)
    scores = pairs_lib.score_samples(judge, items, [[s] for s in samples])
    agg = aggregate([row[0] for row in scores])
    micro = agg["micro"] or {k: 0.0 for k in ("miss", "incorrect", "hallucination", "total")}
    rep = repetition_stats([s.text for s in samples], [s.stopped for s in samples])
    return {"miss": micro["miss"], "incorrect": micro["incorrect"],
            "hallucination": micro["hallucination"], "total": micro["total"],
            "seq_rep_4": rep["seq_rep_4"], "duplicate_sentence_rate": rep["duplicate_sentence_rate"],
            "no_end_token_rate": rep["no_end_token_rate"], "videos": agg["videos"],
            "failed": agg["failed"],
            "captions": [{"id": str(item.get("id", "")), "caption": s.text, "stopped": s.stopped}
                         for item, s in zip(items, samples, strict=True)]}


# ------------------------------------------------------------------------------ the round loop

def round_config(config, opts: MrdpoOptions):
    """The run_stage config of one round: stage mrdpo (sft for the control arm), its step count."""
    cfg = config.copy_and_resolve_references()
    cfg.stage = "sft" if opts.control else "mrdpo"
    cfg.train.num_steps = opts.steps_per_round
    return cfg


def run_mrdpo(config, env, workdir: str | os.PathLike, *, state: st.TrainState,
              train_items: Sequence[Mapping], eval_items: Sequence[Mapping] = (),
              eval_fn: Callable[[st.TrainState], dict] | None = None, mesh=None, judge=None,
              on_step: Callable[[int, int, dict], None] | None = None,
              on_round: Callable[[int, st.TrainState, dict], None] | None = None,
              progress: bool = False, tensorboard: bool = False) -> tuple[st.TrainState, dict]:
    """Run (or resume) `mrdpo.rounds` rounds from `state` (the SFT result: params + trainables).

    env: a PolicyEnv (training/policy_env.py) whose `task` the steps run on.
    train_items: caption records (id, events, caption = GT caption, prompt, video/audio) to sample
        pairs on; `mrdpo.videos_per_round` > 0 takes a fresh slice each round.
    eval_fn(state) -> dict of floats after every round; default: `evaluate_captions` on eval_items
        (greedy) when given. `on_step(round, step, metrics)` is called after every DPO step;
        `on_round(round, state, entry)` after each round's merge and eval, before its checkpoint
        (a run killed in between calls it again on resume, with the same entry).
    The SFT LoRA is merged into the base before round 0 (so every round, the first included, has
    reference == the policy it starts from). On resume `state` only supplies the structure /
    shardings (ShapeDtypeStructs with shardings do: `st.abstract_state`), and the SFT state when
    no round checkpoint exists yet. The passed state's buffers are donated to the steps: get the pre-DPO
    model back with `load_round_state(workdir, 0, target)`. Returns (final state, summary) with summary["history"] = per-round
    {round, pairs stats, first_step, last_step, eval}, summary["preempted"] on SIGTERM.
    """
    from vsalmonn_jax.eval import get_judge
    from vsalmonn_jax.training.loop import run_stage

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    opts = MrdpoOptions.from_config(config)
    rule = PairRule.from_config(config)
    mesh = mesh or make_mesh(dict(config.mesh))
    judge = judge or get_judge(opts.judge, config)
    lora_config = LoraConfig.from_config(config.model.lora)
    default_prompt = str(config.generate.prompt)
    if eval_fn is None and eval_items:
        def eval_fn(s):
            return evaluate_captions(env, s, eval_items, judge, max_new_tokens=opts.eval_max_new_tokens)
    cfg = round_config(config, opts)
    tx, _ = st.make_optimizer(cfg.train, st.num_updates(cfg.train))
    _, shardings = st.state_shardings(env.task, cfg, tx, mesh)
    base_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x6D72)   # "mr"

    ckpts = RoundCheckpoints(workdir / "rounds")
    history: list[dict] = []
    try:
        latest = ckpts.latest()
        if latest is None:
            # fold the SFT LoRA into the base first: round 0's reference is then the SFT model
            # (LoRA off = the merged base), not the base beneath it, and round 0 starts at log 2
            start = 0
            state = merge_round(state, lora_config, jax.random.fold_in(base_key, 0x5F7), shardings,
                                mesh)
            ckpts.save(0, state, {"round": 0, "history": []})
        else:
            state, meta = ckpts.restore(latest, state)
            start, history = int(meta["round"]), list(meta["history"])
        summary: dict[str, Any] = {"preempted": False, "resumed_round": start if latest is not None else None}
        for r in range(start, opts.rounds):
            rdir = workdir / f"round_{r}"
            rdir.mkdir(parents=True, exist_ok=True)
            records, stats = _round_records(env, cfg, state, round_items(
                train_items, r, opts.videos_per_round), judge, rule, opts,
                jax.random.fold_in(base_key, 2 * r), default_prompt, rdir, mesh)
            first_path = rdir / "first_step.json"

            def step_hook(step, metrics, r=r, first_path=first_path):
                if step == 1 and jax.process_index() == 0:
                    write_json(first_path, metrics, indent=1)
                if on_step is not None:
                    on_step(r, step, metrics)

            rows = global_batch(config, mesh, opts.batch_size)
            with process_batches(env, records, mesh, rows,
                                 seed=int(config.data.shuffle_seed) + r) as ahead:
                state, result = run_stage(cfg, ahead, rdir, task=env.task, state=state, mesh=mesh,
                                          num_steps=opts.steps_per_round, on_step=step_hook,
                                          progress=progress, tensorboard=tensorboard)
            if result["preempted"]:
                summary.update(preempted=True, round=r, step=result["step"], signal=result["signal"])
                return state, dict(summary, history=history)
            state = merge_round(state, lora_config, jax.random.fold_in(base_key, 2 * r + 1),
                                shardings, mesh)
            last = {k: v for k, v in result["last"].items() if k not in TIMING_FIELDS}
            first = json.loads(first_path.read_text(encoding="utf-8")) if first_path.exists() else {}
            entry = {"round": r, "pairs": stats, "last_step": last, "first_step": first,
                     "eval": _floats(eval_fn(state)) if eval_fn is not None else {}}
            history.append(entry)
            if on_round is not None:
                on_round(r, state, entry)
            ckpts.save(r + 1, state, {"round": r + 1, "history": history})
            if jax.process_index() == 0:
                write_json(workdir / "mrdpo.json", {"round": r + 1, "history": history}, indent=1)
    finally:
        ckpts.close()
    summary.update(round=opts.rounds, history=history)
    return state, summary


def _floats(metrics: Mapping) -> dict:
    """JSON-able eval metrics (numbers as floats; lists such as captions kept as they are)."""
    return {k: (float(v) if isinstance(v, int | float | np.floating | np.integer) else v)
            for k, v in metrics.items()}


def _round_records(env, config, state, items, judge, rule, opts, rng, default_prompt,
                   rdir: pathlib.Path, mesh) -> tuple[list[dict], dict]:
    """The round's records: read back when already built (resume), else sampled, judged, paired and
    written before any step of the round runs; then (dpo.precompute_reference) the round's reference
    log-probs attached: read from round_<r>/reference.jsonl, or computed once and stored there."""
    path, stats_path = rdir / "pairs.jsonl", rdir / "pair_stats.json"
    if path.exists() and stats_path.exists():
        records, stats = read_jsonl(path), json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        records, log, stats = make_round_records(env, state, items, judge, rule, opts, rng,
                                                 default_prompt)
        if not records:
            raise RuntimeError(f"{rdir.name}: no preference pairs from {len(items)} videos x "
                               f"{opts.samples_per_video} samples (every pair tied); stats: {stats}")
        if jax.process_index() == 0:
            write_jsonl(rdir / "samples.jsonl", log)
            write_jsonl(path, records)
            write_json(stats_path, stats, indent=1)
    if opts.precompute_reference and not opts.control:
        records = round_reference(env, config, state, records, mesh, rdir / REFERENCE_FILE,
                                  batch_size=global_batch(config, mesh, opts.batch_size),
                                  num_steps=opts.steps_per_round)
    return records, stats
