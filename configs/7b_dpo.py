"""7b: Single-round DPO as in the official release: sigmoid DPO (beta 0.1) + 0.1 x GT-caption CE.
Data only: the size preset plus this stage's fields (docs/recipe.md has the commands).
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("7b")
    c.stage = "dpo"
    c.train.update(dict(lr=2e-5, epochs=3))
    c.dpo.update(dict(beta=0.1, gt_ce_weight=0.1))
    return c
