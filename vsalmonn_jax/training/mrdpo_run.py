"""The mrDPO stage of a real run (`vsalmonn-jax train --config.stage=mrdpo`): the AV policy env over
media records, the SFT workdir's trainables, then training/mrdpo.py's round loop (resumable).
"""

from __future__ import annotations

import os
import pathlib

import jax

from vsalmonn_jax.distributed import primary_value
from vsalmonn_jax.models.pretrained import write_record as write_pretrained_record
from vsalmonn_jax.training import pairs as pairs_lib
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.mrdpo import MrdpoOptions, round_config, run_mrdpo
from vsalmonn_jax.training.round_store import RoundCheckpoints
from vsalmonn_jax.training.sharding import make_mesh


def _has_round(rounds: pathlib.Path) -> bool:
    """A round-start state was saved (a run killed before round 0's save leaves `rounds/` empty:
    that run starts afresh, not as a resume). Every process decides as process 0 sees it."""
    if not primary_value(rounds.is_dir()):
        return False
    ckpts = RoundCheckpoints(rounds)
    try:
        return ckpts.latest() is not None
    finally:
        ckpts.close()


def run_from_config(config, workdir: str | os.PathLike, *, init_from: str = "",
                    progress: bool = True, judge=None) -> dict:
    """The mrDPO stage of a real run (AV model, media records), for `vsalmonn-jax train
    --config.stage=mrdpo`: pairs are sampled on the caption records of `data.train` (id, video /
    audio, events, caption), `data.val` (caption records) is evaluated after every round with
    `mrdpo.judge` (or `judge`), and the first run starts from `init_from`'s (the SFT workdir's) trainables; a
    workdir holding rounds/ resumes. Returns the summary (history per round)."""
    from vsalmonn_jax.data.records import load_records
    from vsalmonn_jax.data.text import load_tokenizer
    from vsalmonn_jax.training.checkpoint import restore_init_from
    from vsalmonn_jax.training.policy_env import AVPolicyEnv
    from vsalmonn_jax.training.task import build_task

    if not config.data.tokenizer or not config.data.train:
        raise ValueError("mrdpo needs --config.data.tokenizer=DIR and --config.data.train=CAPTIONS"
                         ".jsonl (caption records with events and the ground-truth caption)")
    workdir = pathlib.Path(workdir)
    opts = MrdpoOptions.from_config(config)
    root = config.data.root or None
    train = load_records(str(config.data.train), kind="caption", root=root)
    val = load_records(str(config.data.val), kind="caption", root=root) if config.data.val else []
    if judge is None:
        pairs_lib.check_judgeable(train + val, opts.judge)
    pairs_lib.check_gt_captions(train, config)
    from vsalmonn_jax.generate.generation_config import warn_unapplied

    warn_unapplied(config, opts.sampling, "mrdpo sampling")
    cfg = round_config(config, opts)
    task = build_task(config)
    mesh = make_mesh(dict(config.mesh))
    tokenizer = load_tokenizer(config.data.tokenizer, config.model.connector.placeholder_token)
    env = AVPolicyEnv(config, task, tokenizer, mesh=mesh, sample_batch=int(config.mrdpo.sample_batch))
    tx, _ = st.make_optimizer(cfg.train, 1)
    if _has_round(workdir / "rounds"):
        state = st.abstract_state(task, cfg, tx, mesh)      # resume: structure + shardings only
    else:
        state, _, record = st.initial_state(task, cfg, tx, mesh, jax.random.PRNGKey(int(config.seed)))
        write_pretrained_record(workdir, record)
        if init_from:   # its trainables (and its base, if that run saved one: a DPO run)
            state, _ = restore_init_from(init_from, state)
    _, summary = run_mrdpo(config, env, workdir, state=state, train_items=train, eval_items=val,
                           mesh=mesh, judge=judge, progress=progress, tensorboard=True)
    return summary
