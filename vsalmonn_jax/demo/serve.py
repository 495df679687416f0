"""Captioning new media with a finished demo run: the `CaptionBackend` (generate/caption_run.py) of a
run directory's final model, applying the demo's own input path to any clip.

The demo never runs its encoders during training: it caches their outputs once and standardises
them with the training clips' statistics (demo/calibrate.py). A new clip therefore goes through the
same steps: decode (the run's FeatureSettings, <= data.max_frames frames, one audio chunk cut to the
Whisper window), the run's frozen random towers (stages/init/model.msgpack), the same standardisation
(statistics from the run's cached train split), then the stage's connectors + LoRA LLM.
"""

from __future__ import annotations

import pathlib
import types

import jax
import numpy as np

from vsalmonn_jax.demo import model as model_lib

FINAL_ORDER = ("rebirth", "mrdpo")   # the method's final model: rebirth, else the last mrDPO round


def is_demo_run(run_dir: pathlib.Path | None, config) -> bool:
    return run_dir is not None and "demo" in config and (run_dir / "stages").is_dir()


def data_dir(run_dir: pathlib.Path, config) -> pathlib.Path:
    """Where the run's data set lives (`demo --data`, recorded as demo.data_dir; default <run>/data)."""
    recorded = str(config.demo.get("data_dir", "") or "")
    return pathlib.Path(recorded) if recorded else run_dir / "data"


def final_stage(run_dir: pathlib.Path, config, checkpoint: str | pathlib.Path) -> str:
    """The stage `checkpoint` names: a stage folder (stages/<name>), an arm's workdir
    (rounds/<arm>[/rounds]: its last finished round) or the run (its final model: rebirth when
    finished, else the last finished mrDPO round)."""
    from vsalmonn_jax.demo.pipeline import stage_names

    path = pathlib.Path(checkpoint).absolute()
    done = [n for n in stage_names(config) if (run_dir / "stages" / n / "done").exists()]
    if path.parent.name == "stages":
        if path.name not in done and path.name != "init":
            raise FileNotFoundError(f"{path}: stage {path.name!r} has not finished (finished: {done})")
        return path.name
    rounds = run_dir / "rounds"
    arm = next((p.name for p in (path, path.parent) if p.parent == rounds), None)
    for prefix in ([arm] if arm else FINAL_ORDER):
        named = [n for n in done if n == prefix or n.startswith(prefix + "_")]
        if named:
            return named[-1]
    raise FileNotFoundError(f"{run_dir}: no finished {arm or 'rebirth or mrDPO'} stage to caption "
                            f"with (finished: {done or 'none'}); finish it with `vsalmonn-jax demo "
                            f"--resume {run_dir}`")


def stage_model(run_dir: pathlib.Path, config, task, name: str) -> dict:
    """{"params", "adapter", "lora"} of a finished stage: its model.msgpack, or for an mrDPO /
    control round the arm's round checkpoint (demo/pipeline.py arm_model)."""
    saved = run_dir / "stages" / name / "model.msgpack"
    if saved.exists():
        return model_lib.load_tree(saved)
    arm, _, index = name.rpartition("_")
    if arm not in ("mrdpo", "control") or not index.isdigit():
        raise FileNotFoundError(f"{saved}: missing (the stage's weights)")
    from vsalmonn_jax.demo.pipeline import arm_model

    pre_dpo = model_lib.load_tree(run_dir / "stages" / "sft" / "model.msgpack")
    ctx = types.SimpleNamespace(config=config, task=task, run_dir=run_dir)
    return arm_model(ctx, pre_dpo, arm, int(index))


def export_state(run_dir: pathlib.Path, config, checkpoint) -> tuple[dict, str]:
    """(state tree {"params": {"llm", "vision", "audio"}, "trainable": {"adapter", "lora"}} as
    `export` reads from a checkpoint, stage name) of the stage `checkpoint` names (its final model
    for the run): the frozen towers are the run's random init."""
    from vsalmonn_jax.data.text import load_tokenizer, token_id

    stage = final_stage(run_dir, config, checkpoint)
    tokenizer = load_tokenizer(str(config.data.tokenizer or data_dir(run_dir, config) / "tokenizer"))
    av_cfg, lcfg = model_lib.configs(config, token_id(tokenizer, config.model.connector.placeholder_token))
    model = stage_model(run_dir, config, model_lib.CachedAVTask(av_cfg, lcfg), stage)
    towers = model_lib.load_tree(run_dir / "stages" / "init" / "model.msgpack")["params"]
    params = {**{k: v for k, v in towers.items() if k != "llm"}, "llm": model["params"]["llm"]}
    trainable = {"adapter": model["adapter"], **({"lora": model["lora"]} if model.get("lora") else {})}
    return {"params": params, "trainable": trainable}, stage


def calibration(config, data: pathlib.Path) -> dict | None:
    """The standardisation statistics the run applied (None when demo.standardize_features is off),
    measured again on its cached train-split encoder outputs."""
    from vsalmonn_jax.demo.calibrate import feature_stats

    if not config.demo.get("standardize_features", True):
        return None
    path = data / "encoded" / "train.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; the demo standardises encoder outputs with the "
                                "train split's statistics (demo/calibrate.py) and reads them there")
    with np.load(path) as f:
        return feature_stats({k: f[k] for k in f.files})


class DemoBackend:
    """CaptionBackend of one stage of a demo run (default: its final model)."""

    def __init__(self, run_dir: pathlib.Path, config, checkpoint, *, sampling, max_new_tokens: int,
                 batch_size: int, seed: int):
        from vsalmonn_jax.data.example import FeatureSettings
        from vsalmonn_jax.data.text import load_tokenizer
        from vsalmonn_jax.demo.batches import Tokens

        demo = config.demo
        data = data_dir(run_dir, config)
        tokenizer = load_tokenizer(str(config.data.tokenizer or data / "tokenizer"))
        self.tokens = Tokens(tokenizer, config.model.connector.placeholder_token,
                             config.generate.prompt, int(demo.max_prompt_tokens),
                             int(demo.max_caption_tokens), int(demo.max_text_tokens))
        av_cfg, lcfg = model_lib.configs(config, self.tokens.placeholder_id)
        self.stage = final_stage(run_dir, config, checkpoint)
        self.task = model_lib.CachedAVTask(av_cfg, lcfg)
        self.variables = stage_model(run_dir, config, self.task, self.stage)
        if not self.variables.get("lora"):
            self.task = model_lib.CachedAVTask(av_cfg, None)
        self.encoders = model_lib.load_tree(run_dir / "stages" / "init" / "model.msgpack")["params"]
        self.stats = calibration(config, data)
        self.settings = FeatureSettings.from_config(config)
        self.max_frames = int(config.data.max_frames)
        self.time_tokens = str(config.data.time_tokens)
        self.mel_frames = 2 * int(config.model.audio.max_source_positions)
        self.sampling, self.max_new_tokens, self.seed = sampling, int(max_new_tokens), int(seed)
        self.batch_size = int(batch_size)

    def prepare(self, item: dict) -> dict:
        """Decode + encode + standardise one clip -> cached-media arrays [1, ...] and its prompt."""
        from vsalmonn_jax.data.example import media_features
        from vsalmonn_jax.data.media import MediaError
        from vsalmonn_jax.demo.calibrate import standardize
        from vsalmonn_jax.demo.data import add_time_tokens, encode_split, pack_clips
        from vsalmonn_jax.generate.caption_run import UnreadableInput

        name = item.get("video") or item.get("audio")
        try:
            decoded = media_features(item.get("video"), item.get("audio"), self.settings)
            packed = pack_clips([decoded], [name], self.settings, self.max_frames, self.mel_frames)
            prompt = self.tokens.prompt_row(item.get("prompt"))
        except (MediaError, ValueError, OSError) as err:
            raise UnreadableInput(str(err)) from err
        media = encode_split(self.task.model, self.encoders, packed, batch=1)
        if self.stats is not None:
            media = standardize(media, self.stats)
        media = add_time_tokens(media, self.tokens.tokenizer, self.time_tokens)
        return {"media": media, "prompt": prompt}

    def caption(self, rows: list[tuple[dict, int, dict]]) -> list[dict]:
        from vsalmonn_jax.demo.caption import Captioner
        from vsalmonn_jax.generate.captioner import row_key

        media = {k: np.concatenate([p["media"][k] for _, _, p in rows]) for k in rows[0][2]["media"]}
        keys = np.stack([np.asarray(jax.random.key_data(row_key(self.seed, item["id"], sample)))
                         for item, sample, _ in rows])
        out = Captioner(self.task, self.tokens, self.variables).run(
            media, np.arange(len(rows)), [p["prompt"] for _, _, p in rows], batch=self.batch_size,
            max_new_tokens=self.max_new_tokens, sampling=self.sampling, keys=keys, details=True)
        return [{"caption": text, "stopped": stopped, "num_tokens": n, "logprob": logprob}
                for text, stopped, n, logprob in out]
