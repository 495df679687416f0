"""tiny: Stage 3, multi-round DPO: per round k samples (top-p 0.9, T 1.0), judged pairs, N DPO steps,
merge LoRA + fresh LoRA.
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("tiny")
    c.stage = "mrdpo"
    c.dpo.precompute_reference = True   # reference log-probs once per round, not in every step
    c.train.update(dict(lr=2e-4))
    c.mrdpo.update(dict(rounds=3, steps_per_round=100, samples_per_video=2))
    c.generate.update(dict(max_new_tokens=136, temperature=1.0, top_p=0.9))
    return c
