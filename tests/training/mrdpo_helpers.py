"""Shared set-up of the mrDPO / rebirth tests: tiny text policy, local tokenizer, items, a fake judge.

The fake judge makes pair ranking depend only on the caption text (so a random tiny model yields
pairs); the exact judge is exercised on hand-written captions in test_mrdpo_pairs.py.
"""

import functools

import jax
import numpy as np

from vsalmonn_jax.config import load_config
from vsalmonn_jax.data.synthetic import tokenizer_corpus
from vsalmonn_jax.data.synthetic_scene import default_config, make_scene, reference_caption
from vsalmonn_jax.data.tokenizer_build import build_tokenizer
from vsalmonn_jax.eval.judge import Judge
from vsalmonn_jax.eval.metrics import VideoScore
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.policy_env import TextPolicyEnv
from vsalmonn_jax.training.sharding import make_mesh
from vsalmonn_jax.training.task import build_task


@functools.lru_cache(maxsize=1)
def tokenizer(path: str):
    return build_tokenizer(tokenizer_corpus(default_config(), "<media>"), path, 512, "<media>")


def items(count: int, split_base: int = 0, prompt_tag: bool = True) -> list[dict]:
    """Caption records of synthetic scenes (events + exact GT caption); text-only prompts."""
    out = []
    for i in range(count):
        scene = make_scene(7, split_base + i)
        prompt = "Please describe the video in detail."
        if prompt_tag:
            prompt = f"{prompt} At {i % 9} s."
        out.append({"id": f"v{split_base + i}", "prompt": prompt, "events": scene.events,
                    "caption": reference_caption(scene)})
    return out


class LengthJudge(Judge):
    """Deterministic fake: hallucinated = words % 5, missed = characters % 3 (text-only ranking)."""

    name = "length"

    def score_many(self, pairs, ids=None):
        ids = ids or [str(i) for i in range(len(pairs))]
        return [VideoScore(id=i, num_events=len(events), missed=len(caption) % 3,
                           hallucinated=len(caption.split()) % 5)
                for i, (caption, events) in zip(ids, pairs, strict=True)]


def config(*overrides):
    return load_config("tiny", [
        "stage=mrdpo", "train.lr=0.003", "train.warmup_ratio=0.0", "train.log_every=1",
        "train.checkpoint_every=2", "mrdpo.rounds=2", "mrdpo.steps_per_round=4",
        "mrdpo.samples_per_video=2", "mrdpo.max_new_tokens=8", "mrdpo.batch_size=4",
        "generate.max_new_tokens=8", "data.batch_size=4", *overrides])


def setup(cfg, tok, devices: int = 2, seed: int = 0):
    """(env, mesh, fresh SFT-like state) for the text task."""
    mesh = make_mesh({"data": -1}, devices=jax.devices()[:devices])
    task = build_task(cfg, text_only=True)
    env = TextPolicyEnv(task, tok, sample_batch=8)
    tx, _ = st.make_optimizer(cfg.train, 1)
    state, _ = st.create_train_state(task, cfg, tx, mesh, jax.random.PRNGKey(seed))
    return env, mesh, state


def fresh_state(env, cfg, mesh, seed: int = 0, trained_lora: bool = False):
    """A state as SFT leaves it; `trained_lora`: LoRA B != 0 (an SFT LoRA to be merged first)."""
    tx, _ = st.make_optimizer(cfg.train, 1)
    state = st.create_train_state(env.task, cfg, tx, mesh, jax.random.PRNGKey(seed))[0]
    if trained_lora:
        rng = np.random.default_rng(seed)
        lora = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
            np.float32), jax.device_get(state.trainable["lora"]))
        lora = jax.device_put(lora, jax.tree.map(lambda x: x.sharding, state.trainable["lora"]))
        state = state.replace(trainable=dict(state.trainable, lora=lora))
    return state
