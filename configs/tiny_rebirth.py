"""tiny: Stage 4, rebirth tuning: SFT the pre-DPO model on the mrDPO model's captions + its non-caption data.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("tiny")
    c.stage = "rebirth"
    c.train.update(dict(lr=1e-3, num_steps=400))
    c.rebirth.update(dict(non_caption_ratio=0.3))
    return c
