"""tiny: Stage 2, audio-visual SFT: LoRA + connectors on detailed captions and QA.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("tiny")
    c.stage = "sft"
    c.train.update(dict(lr=1e-3, num_steps=600))
    return c
