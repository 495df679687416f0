"""7b: Stage 1, audio alignment: audio-only inputs (ASR / audio captions), connectors trained.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("7b")
    c.stage = "align"
    c.train.update(dict(lr=2e-5, num_steps=30000, trainable=("adapter",), frozen=()))
    return c
