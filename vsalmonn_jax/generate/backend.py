"""The caption backend of a checkpoint (generate/caption_run.py's CaptionBackend), shared by the
`caption` command and the `Captioner` API: a demo run's final model (demo/serve.py) or the AV model
restored from a training checkpoint (generate/captioner.py).
"""

from __future__ import annotations

import pathlib


def open_backend(config, run_dir: pathlib.Path | None, checkpoint, *, step=None, sampling,
                 max_new_tokens: int, batch_size: int, seed: int):
    """(backend, one line saying which model it is)."""
    from vsalmonn_jax.demo.serve import DemoBackend, is_demo_run

    if is_demo_run(run_dir, config):
        backend = DemoBackend(run_dir, config, checkpoint, sampling=sampling,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        return backend, f"demo run {pathlib.Path(run_dir).resolve()}, stage {backend.stage}"

    from vsalmonn_jax.data.text import load_tokenizer
    from vsalmonn_jax.generate.captioner import AVCaptioner
    from vsalmonn_jax.generate.model_load import restore_for_inference
    from vsalmonn_jax.training.av_task import build
    from vsalmonn_jax.training.sharding import make_mesh

    if not config.data.tokenizer:
        raise ValueError("no tokenizer: the run keeps none (<run>/tokenizer) and config.data."
                         "tokenizer is empty; pass --tokenizer DIR")
    tokenizer = load_tokenizer(config.data.tokenizer, config.model.connector.placeholder_token)
    mesh = make_mesh(dict(config.mesh))
    task = build(config)
    variables, info = restore_for_inference(config, task, mesh, checkpoint, step)
    if info["base"] != "from the checkpoint":
        from vsalmonn_jax.models.pretrained import warn_if_random

        warn_if_random(info["pretrained"], "caption")
    backend = AVCaptioner(config, task, variables, tokenizer, sampling=sampling,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, mesh=mesh)
    return backend, f"model from {info['checkpoint']} step {info['step']} (base {info['base']})"
