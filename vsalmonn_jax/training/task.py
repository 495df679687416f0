"""The "task model" protocol the training steps run on, and its text-only Qwen2 implementation.

A task model turns a model-ready batch into final hidden states + shifted targets; the steps never
know whether media were spliced in. The AV model (models/av_llm.py) plugs in by implementing the same
four methods (training/av_task.py); `build_task(config)` picks one.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsalmonn_jax.training.losses import shift_targets

TEXT_FIELDS = ("input_ids", "attention_mask", "loss_mask")


class TaskModel(Protocol):
    """What the training engine needs from a model.

    init(rng, collections) -> {"params": ..., "lora": ..., "adapter": ...} (leaves boxed with
        nn.Partitioned logical names; only the trainable collections asked for besides "params").
    encode(variables, batch) -> media pytree (batch-major) or None: the FROZEN encoders' outputs
        (SigLIP / Whisper features), computed once per step and shared by every forward (decision 13).
    forward(variables, text, media, *, deterministic, rngs) -> (hidden [B,T,H], targets [B,T],
        mask bool [B,T]): text = {"input_ids","attention_mask","loss_mask"} [B,T]; targets/mask are
        already shifted (position t predicts targets[t]) and cover the spliced sequence.
    logits(variables, hidden) -> [B,T,V] fp32 (applied chunk by chunk by the losses).
    forward_packed(variables, packed, media, *, deterministic, rngs) -> training/packing.py's
        packed_output dict: the prefix-shared DPO forward on packed rows (packed = pack_branches'
        fields [B,W]); media are those of the B pairs (once per pair). Optional: a task without it
        runs DPO unshared.
    Optional, for train.feature_cache: raw_media_keys (batch fields the encoders read),
    encoder_params(params), encoder_fingerprint, with_features(batch, features) -> media.
    Variables passed in: "params" always; "lora" absent = LoRA disabled (the DPO reference).
    """

    def init(self, rng: jax.Array, collections: tuple[str, ...]) -> dict[str, Any]: ...

    def encode(self, variables: dict, batch: dict) -> Any: ...

    def forward(self, variables: dict, text: dict, media: Any, *, deterministic: bool,
                rngs: dict | None) -> tuple[jax.Array, jax.Array, jax.Array]: ...

    def logits(self, variables: dict, hidden: jax.Array) -> jax.Array: ...


def box_like(tree, specs):
    """Wrap each leaf of `tree` in nn.LogicallyPartitioned with the logical names of the matching spec."""
    return jax.tree.map(lambda x, s: nn.LogicallyPartitioned(x, names=tuple(s)), tree, specs,
                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def boxed_lora(rng: jax.Array, params, lora_config) -> dict:
    """A fresh LoRA tree for (boxed) base `params`, boxed with the logical names of the kernels it
    adapts (so state_shardings places it like its base)."""
    from vsalmonn_jax.lora import init_lora, lora_partition_specs

    lora = init_lora(rng, nn.unbox(params), lora_config)
    return box_like(lora, lora_partition_specs(nn.get_partition_spec(params), lora))


def present(variables: dict) -> dict:
    """Drop empty collections (a model never sees an empty "adapter" or "lora")."""
    return {k: v for k, v in variables.items() if v is not None and (k == "params" or len(v))}


class TextTask:
    """Text-only Qwen2 + LoRA (SFT / DPO on plain ChatML token sequences); no media, no adapter."""

    def __init__(self, llm_config, lora_config=None):
        from vsalmonn_jax.models.qwen2 import Qwen2

        self.llm_config = llm_config
        self.lora_config = lora_config
        self.model = Qwen2(llm_config, lora=lora_config)

    def init(self, rng, collections=("lora",)):
        k_params, k_lora = jax.random.split(rng)
        params = self.model.init(k_params, jnp.zeros((1, 8), jnp.int32))["params"]
        out = {"params": params}
        if "lora" in collections and self.lora_config is not None:
            out["lora"] = boxed_lora(k_lora, params, self.lora_config)
        if "adapter" in collections:
            out["adapter"] = {}
        return out

    def encode(self, variables, batch):
        return None

    def forward(self, variables, text, media, *, deterministic, rngs):
        mask = text["attention_mask"].astype(bool)
        hidden, _ = self.model.apply(present(variables), text["input_ids"], attention_mask=mask,
                                     deterministic=deterministic, return_hidden=True, rngs=rngs)
        targets, loss_mask = shift_targets(text["input_ids"], text["loss_mask"] & mask)
        return hidden, targets, loss_mask

    def forward_packed(self, variables, packed, media, *, deterministic, rngs):
        from vsalmonn_jax.models.qwen2 import branch_positions
        from vsalmonn_jax.training.packing import packed_output

        mask = packed["attention_mask"].astype(bool)
        hidden, _ = self.model.apply(present(variables), packed["input_ids"], attention_mask=mask,
                                     positions=branch_positions(mask, packed["branch_ids"]),
                                     branch_ids=packed["branch_ids"], deterministic=deterministic,
                                     return_hidden=True, rngs=rngs)
        return packed_output(hidden, packed)

    def logits(self, variables, hidden):
        return self.model.apply(present(variables), hidden, method="lm_logits")


def build_task(config, text_only: bool | None = None, placeholder_id: int | None = None
               ) -> TaskModel:
    """The task model for `config`: the AV model (training/av_task.py) or text-only Qwen2.

    text_only=None decides from the inputs: AV when a placeholder id is given or the config names
    a tokenizer (`data.tokenizer`, i.e. real media records), else text-only (synthetic token data,
    shape-only planning).
    """
    from vsalmonn_jax.lora import LoraConfig
    from vsalmonn_jax.models.qwen2 import Qwen2Config

    if text_only is None:
        text_only = placeholder_id is None and not config.data.tokenizer
    if not text_only:
        from vsalmonn_jax.training import av_task

        return av_task.build(config, placeholder_id)
    lora = LoraConfig.from_config(config.model.lora) if "lora" in config.train.trainable else None
    return TextTask(Qwen2Config.from_config(config.model.llm), lora)
