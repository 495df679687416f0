"""The audio-visual model (models/av_llm.py) as a training task model (see training/task.py).

encode() = the frozen SigLIP / Whisper features (once per step, shared by chosen / rejected / gt /
reference); forward() = connectors + splice + Qwen2 on the spliced sequence, returning shifted
targets and loss mask at the spliced length; forward_packed() the same on prefix-shared rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsalmonn_jax.lora import LoraConfig
from vsalmonn_jax.models import av_llm
from vsalmonn_jax.training.losses import shift_targets
from vsalmonn_jax.training.packing import packed_output
from vsalmonn_jax.training.task import boxed_lora, present

FEATURES = ("vision", "audio")


def _forward(module: av_llm.AVLLM, text: dict, media: dict | None, deterministic: bool):
    cfg = module.config
    batch = text["input_ids"].shape[0]
    if media is not None and any(k in media for k in FEATURES):
        embeds, mask = module.connect(media, deterministic)
    else:
        embeds = jnp.zeros((batch, 0, cfg.llm.hidden_size), cfg.llm.dtype)
        mask = jnp.zeros((batch, 0), bool)
    spliced = module.splice(embeds, mask, text["input_ids"], text["attention_mask"],
                            text["loss_mask"], text.get("branch_ids"))
    hidden = module.decode(spliced, deterministic, return_hidden=True)
    return hidden, {k: v for k, v in spliced.items() if k != "inputs_embeds"}


class AVTask:
    """video-SALMONN 2 for the training steps. Variables: params {vision, audio, llm}, adapter
    {vision_connector, audio_connector}, lora {llm: ...}."""

    def __init__(self, config, placeholder_id: int, lora_config: LoraConfig | None = None):
        self.av_config = av_llm.AVConfig.from_config(config, placeholder_id)
        self.llm_config = self.av_config.llm
        self.lora_config = lora_config
        self.model = av_llm.AVLLM(self.av_config, lora=lora_config)

    def init(self, rng, collections=("lora", "adapter")):
        variables = av_llm.init_variables(rng, self.av_config, None)
        out = {"params": variables["params"]}
        if "adapter" in collections:
            out["adapter"] = variables.get("adapter", {})
        if "lora" in collections and self.lora_config is not None:
            out["lora"] = {"llm": boxed_lora(jax.random.fold_in(rng, 1), variables["params"]["llm"],
                                             self.lora_config)}
        return out

    raw_media_keys = ("pixel_values", "mel")

    @property
    def encoder_fingerprint(self):
        return (self.av_config.vision, self.av_config.audio)

    def encoder_params(self, params):
        return {k: params[k] for k in ("vision", "audio") if k in params}

    def with_features(self, batch, features):
        """Media pytree from cached encoder outputs + the batch's masks / times."""
        return {**{k: batch[k] for k in av_llm.MEDIA_KEYS if k in batch}, **features}

    def encode(self, variables, batch):
        if "pixel_values" not in batch and "mel" not in batch:
            return None
        return self.model.apply({"params": variables["params"]}, batch, method="encode_frozen")

    def forward(self, variables, text, media, *, deterministic, rngs):
        hidden, spliced = self.model.apply(present(variables), text, media, deterministic,
                                           method=_forward, rngs=rngs)
        targets, mask = shift_targets(spliced["targets"], spliced["loss_mask"])
        return hidden, targets, mask

    def forward_packed(self, variables, packed, media, *, deterministic, rngs):
        """One packed row per pair (training/packing.py): media connected and spliced once."""
        hidden, spliced = self.model.apply(present(variables), packed, media, deterministic,
                                           method=_forward, rngs=rngs)
        return packed_output(hidden, spliced)

    def logits(self, variables, hidden):
        return self.model.apply(present(variables), hidden, method="lm_logits")


def placeholder_id_of(config) -> int:
    """The media placeholder's token id from `config.data.tokenizer`; without a tokenizer (shape-only
    uses such as `plan`), the last vocabulary id stands in."""
    if config.data.tokenizer:
        from vsalmonn_jax.data.text import load_tokenizer, token_id

        placeholder = config.model.connector.placeholder_token  # added when the tokenizer lacks it
        return token_id(load_tokenizer(config.data.tokenizer, placeholder), placeholder)
    return int(config.model.llm.vocab_size) - 1


def build(config, placeholder_id: int | None = None) -> AVTask:
    lora = LoraConfig.from_config(config.model.lora) if "lora" in config.train.trainable else None
    pid = placeholder_id_of(config) if placeholder_id is None else placeholder_id
    return AVTask(config, pid, lora)
