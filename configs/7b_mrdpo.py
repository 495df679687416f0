"""7b: Stage 3, multi-round DPO: per round k samples (top-p 0.9, T 1.0), judged pairs, N DPO steps,
merge LoRA + fresh LoRA.
"""

from vsalmonn_jax.config import load_config


def get_config():
    c = load_config("7b")
    c.stage = "mrdpo"
    c.dpo.precompute_reference = True   # reference log-probs once per round, not in every step
    c.train.update(dict(lr=2e-5))
    # the release samples with HF generate(do_sample=True, top_p=0.9) under transformers 4.39.2
    # (its requirements.txt), whose defaults supply temperature 1.0 and top_k 50
    c.mrdpo.update(dict(rounds=3, steps_per_round=1000, samples_per_video=2, top_p=0.9,
                        temperature=1.0, top_k=50))
    c.generate.update(dict(max_new_tokens=1024, temperature=1.0, top_p=0.9))
    return c
