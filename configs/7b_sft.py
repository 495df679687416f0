"""7b: Stage 2, audio-visual SFT: LoRA + connectors on detailed captions and QA.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("7b")
    c.stage = "sft"
    c.train.update(dict(lr=2e-5, epochs=5))
    return c
