"""Shared helpers for the training tests: tiny configs, a media-using toy task, batch placement.

`MediaTask` stands in for the AV model: a frozen "encoder" (params) turns per-example media
features into a vector, a trainable adapter projects it to one prefix embedding of the LLM input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.config import load_config
from vsalmonn_jax.models.qwen2 import branch_positions
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training import steps as sp
from vsalmonn_jax.training.losses import shift_targets
from vsalmonn_jax.training.packing import packed_output
from vsalmonn_jax.training.sharding import make_mesh
from vsalmonn_jax.training.task import TextTask, build_task, present

MEDIA_DIM = 6


def tiny_config(*overrides):
    return load_config("tiny", list(overrides))


def mesh_of(n: int, **axes):
    return make_mesh(axes or {"data": -1}, devices=jax.devices()[:n])


def build(config, mesh, task=None, rng_seed=0):
    task = task or build_task(config, text_only=True)
    tx, schedule = st.make_optimizer(config.train, st.num_updates(config.train))
    state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(rng_seed))
    steps = sp.make_steps(task, config, tx, schedule, mesh, shardings)
    return task, state, steps


def device_batch(batch, steps):
    return sp.put_batch({k: v for k, v in batch.items() if k != "example_id"}, steps.batch_sharding)


def host(tree):
    return jax.tree.map(np.asarray, tree)


class MediaTask(TextTask):
    """TextTask + media: encode() = frozen tanh(media @ W_enc); adapter maps it to a prefix token."""

    encode_calls = 0
    raw_media_keys = ("media",)

    def encoder_params(self, params):
        return params["media_encoder"]

    def with_features(self, batch, features):
        return features

    def init(self, rng, collections=("lora", "adapter")):
        out = super().init(rng, tuple(c for c in collections if c != "adapter"))
        k1, k2 = jax.random.split(jax.random.fold_in(rng, 7))
        hidden = self.llm_config.hidden_size
        out["params"] = dict(out["params"], media_encoder=nn.LogicallyPartitioned(
            jax.random.normal(k1, (MEDIA_DIM, 8)), names=(None, None)))
        if "adapter" in collections:
            out["adapter"] = {"proj": nn.LogicallyPartitioned(
                0.1 * jax.random.normal(k2, (8, hidden)), names=(None, "embed"))}
        return out

    def encode(self, variables, batch):
        MediaTask.encode_calls += 1
        return {"features": jnp.tanh(batch["media"] @ variables["params"]["media_encoder"])}

    def _llm_vars(self, variables):
        params = {k: v for k, v in variables["params"].items() if k != "media_encoder"}
        return present({"params": params, "lora": variables.get("lora")})

    def _with_media(self, variables, text, media):
        """The media vector as one prefix token before the text: (embeds [B,1+T,H], row fields)."""
        llm = self._llm_vars(variables)
        embeds = self.model.apply(llm, text["input_ids"], method="embed")  # [B,T,H]
        prefix = (media["features"] @ variables["adapter"]["proj"])[:, None, :]  # [B,1,H]
        embeds = jnp.concatenate([prefix.astype(embeds.dtype), embeds], axis=1)
        ones = jnp.ones_like(text["attention_mask"][:, :1])
        mask = jnp.concatenate([ones, text["attention_mask"]], axis=1).astype(bool)
        row = {"attention_mask": mask,
               "input_ids": jnp.concatenate([jnp.zeros_like(text["input_ids"][:, :1]), text["input_ids"]], 1),
               "loss_mask": jnp.concatenate([jnp.zeros_like(ones), text["loss_mask"]], axis=1).astype(bool)
               & mask}
        if "branch_ids" in text:
            row["branch_ids"] = jnp.concatenate([jnp.zeros_like(ones, jnp.int32), text["branch_ids"]], 1)
        return embeds, row

    def forward(self, variables, text, media, *, deterministic, rngs):
        embeds, row = self._with_media(variables, text, media)
        hidden, _ = self.model.apply(self._llm_vars(variables), inputs_embeds=embeds,
                                     attention_mask=row["attention_mask"],
                                     deterministic=deterministic, return_hidden=True, rngs=rngs)
        targets, loss_mask = shift_targets(row["input_ids"], row["loss_mask"])
        return hidden, targets, loss_mask

    def forward_packed(self, variables, packed, media, *, deterministic, rngs):
        embeds, row = self._with_media(variables, packed, media)
        positions = branch_positions(row["attention_mask"], row["branch_ids"])
        hidden, _ = self.model.apply(self._llm_vars(variables), inputs_embeds=embeds,
                                     attention_mask=row["attention_mask"], positions=positions,
                                     branch_ids=row["branch_ids"], deterministic=deterministic,
                                     return_hidden=True, rngs=rngs)
        return packed_output(hidden, row)

    def logits(self, variables, hidden):
        return self.model.apply(self._llm_vars(variables), hidden, method="lm_logits")
