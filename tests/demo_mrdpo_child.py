"""The tiny demo's mrDPO arm in a process of its own, as a preempted job runs: whole, stopped by SIGTERM
in round 2, or resumed. test_demo_mrdpo.py starts it and compares what it writes (and shares its set-up).

usage: demo_mrdpo_child.py full|stop|resume DATA_DIR RUN_DIR OUT   (writes OUT.json and OUT.npz)
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

TINY = ["--config.demo.n_train=8", "--config.demo.n_val=4", "--config.demo.n_test=8", "--config.demo.n_fresh=8",
        "--config.demo.eval_batch=8", "--config.demo.batch_size=8", "--config.demo.dpo_steps=3",
        "--config.demo.render_workers=1", "--config.mrdpo.rounds=2",
        # 8 barely trained clips: with 4 samples each, round 2's samples all tied (no pair)
        "--config.mrdpo.samples_per_video=8"]
STOP_AT = (1, 2)   # (round index, step): SIGTERM after round 2's second step


def tiny_config():
    from vsalmonn_jax.commands.demo import demo_config

    return demo_config(True, None, TINY)


def pre_dpo(ctx, base: dict) -> dict:
    """The base model with an SFT-like LoRA (B != 0, fixed noise): merged before round 1."""
    from vsalmonn_jax.lora import init_lora

    lora = init_lora(jax.random.PRNGKey(1), base["params"]["llm"], ctx.task.model.lora)
    noise = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: np.asarray(x) + 0.02 * noise.standard_normal(x.shape).astype(
        np.float32), jax.device_get(lora))
    return dict(base, lora={"llm": lora})


def flat(tree) -> dict[str, np.ndarray]:
    """{key path: host array} of a pytree (what np.savez stores)."""
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def main(mode: str, data_dir: str, run_dir: str, out: str) -> int:
    from vsalmonn_jax import compile_cache
    from vsalmonn_jax.demo.pipeline import Preempted, arm_model, mrdpo_arm, setup

    jax.config.update("jax_default_matmul_precision", "highest")   # as the test processes
    compile_cache.enable()
    logs: list[str] = []
    ctx, base = setup(tiny_config(), pathlib.Path(run_dir), pathlib.Path(data_dir), logs.append)
    pre = pre_dpo(ctx, base)
    result: dict = {}

    def on_step(r, step, metrics):
        if mode == "stop" and (r, step) == STOP_AT:
            signal.raise_signal(signal.SIGTERM)   # the loop saves after this step and stops

    try:
        records = mrdpo_arm(ctx, pre, "mrdpo", on_step=on_step)
    except Preempted as err:
        result["preempted"] = str(err)
    else:
        result["stats"] = {name: record["stats"] for name, record in records.items()}
        np.savez(f"{out}.npz", **flat(arm_model(ctx, pre, "mrdpo", 2)))
    result["logs"] = logs
    pathlib.Path(f"{out}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
