"""tiny: Stage 1, audio alignment: audio-only inputs (ASR / audio captions), connectors trained.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("tiny")
    c.stage = "align"
    c.train.update(dict(lr=1e-3, num_steps=200, trainable=("adapter",)))
    return c
