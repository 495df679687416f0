"""The demo's AV model around cached encoder outputs: a training task model (training/task.py
protocol) whose media come from the batch, prompt splicing for generation, and weight files.

Variable layout: params = {"llm": frozen base}, adapter = {"vision_connector", "audio_connector"},
lora = {"llm": ...}. For the full-parameter "pretraining" of the tiny base the LLM weights ride in
the trainable adapter tree as adapter["llm"] (the task moves them back into params).
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from vsalmonn_jax.atomic_file import write_bytes
from vsalmonn_jax.lora import LoraConfig
from vsalmonn_jax.models.av_llm import AVLLM, AVConfig, init_adapter, init_variables
from vsalmonn_jax.models.qwen2 import Qwen2
from vsalmonn_jax.training.losses import shift_targets
from vsalmonn_jax.training.packing import packed_output
from vsalmonn_jax.training.task import boxed_lora

MEDIA_FIELDS = ("vision", "audio", "frame_mask", "frame_times", "audio_seconds", "has_video",
                "has_audio", "time_ids", "time_mask")


def configs(config, placeholder_id: int) -> tuple[AVConfig, LoraConfig]:
    return AVConfig.from_config(config, placeholder_id), LoraConfig.from_config(config.model.lora)


def random_init(cfg: AVConfig, rng: jax.Array) -> dict:
    """Unboxed host {"params", "adapter"} at random init (seeded): encoders, LLM, connectors."""
    return jax.device_get(nn.unbox(init_variables(rng, cfg, None)))


def media_of(batch: dict) -> dict:
    """The cached media fields of a batch (fp16 features cast to fp32). A batch without "vision" or
    "audio" (audio-only alignment, visual-only pretraining) makes connect() skip that modality."""
    media = {k: batch[k] for k in MEDIA_FIELDS if k in batch}
    for name in ("vision", "audio"):
        if name in media:
            media[name] = media[name].astype(jnp.float32)
    return media


def _layout(variables: dict) -> dict:
    params = dict(variables["params"])
    adapter = dict(variables.get("adapter", {}))
    if "llm" in adapter:  # full-parameter pretraining of the base
        params["llm"] = adapter.pop("llm")
    out = {"params": params}
    if adapter:
        out["adapter"] = adapter
    if variables.get("lora"):
        out["lora"] = variables["lora"]
    return out


class CachedAVTask:
    """TaskModel over cached encoder outputs: encode() reads them from the batch (no encoders run)."""

    def __init__(self, cfg: AVConfig, lora: LoraConfig | None):
        self.cfg = cfg
        self.model = AVLLM(cfg, lora)

    def init(self, rng, collections=("lora", "adapter")):
        """Boxed {"params": {"llm"}, "adapter", "lora": {"llm"}} at random init: the train state's
        structure and shardings (the demo's weights come from its own stages, never from here)."""
        k_llm, k_adapter, k_lora = jax.random.split(rng, 3)
        llm = Qwen2(self.cfg.llm).init(k_llm, jnp.zeros((1, 1), jnp.int32))["params"]
        out = {"params": {"llm": llm}}
        if "adapter" in collections:
            out["adapter"] = init_adapter(k_adapter, self.cfg)
        if "lora" in collections and self.model.lora is not None:
            out["lora"] = {"llm": boxed_lora(k_lora, llm, self.model.lora)}
        return out

    def encode(self, variables, batch):
        return media_of(batch)

    def spliced(self, variables, text, media, deterministic: bool = True, rngs=None):
        v = _layout(variables)
        embeds, mask = self.model.apply(v, media, deterministic, method="connect", rngs=rngs)
        return self.model.apply(v, embeds, mask, text["input_ids"], text["attention_mask"],
                                text["loss_mask"], text.get("branch_ids"), method="splice")

    def forward(self, variables, text, media, *, deterministic, rngs):
        spliced = self.spliced(variables, text, media, deterministic, rngs)   # Q-Former dropout
        hidden = self.model.apply(_layout(variables), spliced, deterministic, True, method="decode",
                                  rngs=rngs)
        targets, mask = shift_targets(spliced["targets"], spliced["loss_mask"])
        return hidden, targets, mask

    def forward_packed(self, variables, packed, media, *, deterministic, rngs):
        """Prefix-shared DPO rows (training/packing.py): one spliced row per pair."""
        spliced = self.spliced(variables, packed, media, deterministic, rngs)
        hidden = self.model.apply(_layout(variables), spliced, deterministic, True, method="decode",
                                  rngs=rngs)
        return packed_output(hidden, spliced)

    def logits(self, variables, hidden):
        return self.model.apply(_layout(variables), hidden, method="lm_logits")


def save_tree(path: pathlib.Path, tree) -> None:
    write_bytes(path, serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(tree))))


def load_tree(path: pathlib.Path):
    return serialization.msgpack_restore(path.read_bytes())
