"""The audio-visual captioning backend: record -> features -> spliced prompt embeddings -> KV-cache decode.

Media are decoded and featurised by data/example.py's `Featurizer` (bad files raise `UnreadableInput`
with the decoder's reason), batched by data/collate.py, encoded + connected + spliced by the AV model
(models/av_llm.py) once per distinct item, and the LLM generates from `inputs_embeds`. Each (item id,
sample) row draws from its own key, so captions do not depend on batching or on a resume.
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.data.collate import collate
from vsalmonn_jax.data.example import Featurizer, media_positions
from vsalmonn_jax.data.text import ENDOFTEXT, IM_END, token_id
from vsalmonn_jax.distributed import to_host
from vsalmonn_jax.generate.caption_run import UnreadableInput
from vsalmonn_jax.generate.decode import generate
from vsalmonn_jax.generate.decode_layout import decode_layout
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.models.qwen2 import Qwen2
from vsalmonn_jax.training.sharding import logical_rules

HOST_ONLY = ("example_id",)


def row_key(seed: int, item_id: str, sample: int) -> jax.Array:
    """The PRNG key of one (item, sample): a function of the seed, the id and the sample index."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(item_id.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, sample)


def _spliced_inputs(module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """AVLLM method: frozen encoders -> connectors -> splice. (inputs_embeds [B,L,H], mask [B,L])."""
    cfg = module.config
    media = module.encode_frozen(batch)
    if "vision" in media or "audio" in media:
        embeds, mask = module.connect(media)
    else:
        b = batch["input_ids"].shape[0]
        embeds = jnp.zeros((b, 0, cfg.llm.hidden_size), cfg.llm.dtype)
        mask = jnp.zeros((b, 0), bool)
    spliced = module.splice(embeds, mask, batch["input_ids"], batch["attention_mask"],
                            batch["loss_mask"])
    return spliced["inputs_embeds"], spliced["attention_mask"]


@functools.partial(jax.jit, static_argnums=0)
def spliced_inputs(module, variables: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Jitted `_spliced_inputs` (cached across captioner instances: modules compare by value)."""
    return module.apply(variables, batch, method=_spliced_inputs)


def prompt_positions(example: dict, av_config) -> int:
    """An upper bound on the positions a featurised example's prompt takes: its text tokens with
    the media placeholder replaced by its media tokens (data/example.py media_positions)."""
    return len(example["input_ids"]) + media_positions(example, av_config)


class AVCaptioner:
    """`CaptionBackend` over the AV model. `variables` = {"params", "adapter", ["lora"]} (unboxed)."""

    def __init__(self, config, task, variables: dict, tokenizer, *, sampling: SamplingConfig,
                 max_new_tokens: int, batch_size: int, seed: int = 0, mesh=None):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.sampling, self.max_new_tokens, self.seed, self.mesh = sampling, max_new_tokens, seed, mesh
        self.shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-int(batch_size) // self.shards) * self.shards   # rows divide the mesh
        self.featurizer = Featurizer.from_config(config)
        self.featurizer._tokenizer = tokenizer             # the given tokenizer is authoritative
        self.pad_id = token_id(tokenizer, ENDOFTEXT)
        self.stop_ids = tuple(sorted({token_id(tokenizer, IM_END), self.pad_id}))
        lora = variables.get("lora") or None
        self.encode_vars = {k: variables[k] for k in ("params", "adapter") if variables.get(k)}
        self.llm = Qwen2(task.av_config.llm, lora=task.lora_config if lora else None)
        llm_vars = {"params": variables["params"]["llm"], **({"lora": lora["llm"]} if lora else {})}
        # gathered once over fsdp when it fits: no all-gather of every layer per decoded token
        self.llm_vars, self.decode_layout = decode_layout(
            llm_vars, str(config.generate.get("decode_layout", "auto")))

    @contextlib.contextmanager
    def rows_per_call(self, rows: int):
        """Inside, calls pad to the fewest rows that hold `rows` (a multiple of the mesh's batch
        shards) instead of batch_size: caption_run's retry after an out-of-memory error (one more
        compilation for the smaller shape)."""
        saved = self.batch_size
        self.batch_size = min(saved, -(-int(rows) // self.shards) * self.shards)
        try:
            yield
        finally:
            self.batch_size = saved

    def prepare(self, item: dict) -> dict:
        record = {k: v for k, v in item.items() if k not in ("kind",)}
        example = self.featurizer({**record, "kind": "caption"})
        if "failed" in example:
            raise UnreadableInput(f"{example['failed']}: {example.get('detail', '')}".rstrip(": "))
        prompt, limit = prompt_positions(example, self.task.av_config), self.llm.config.max_position_embeddings
        if prompt + self.max_new_tokens > limit:   # refused here, not by generate: the batch goes on
            raise UnreadableInput(
                f"too long: its prompt takes up to {prompt} positions (media + text) and "
                f"max_new_tokens {self.max_new_tokens} more, over the model's {limit} "
                "(max_position_embeddings); use fewer frames (--config.data.max_frames) or fewer "
                "new tokens (--max-new-tokens)")
        return example

    def caption(self, rows: list[tuple[dict, int, dict]]) -> list[dict]:
        if self.mesh is None:
            return self._caption(rows)
        # the mesh only around device work: host-side featurising (prepare) runs jax on one CPU
        with jax.set_mesh(self.mesh), logical_rules():
            return self._caption(rows)

    def _caption(self, rows: list[tuple[dict, int, dict]]) -> list[dict]:
        order, unique = {}, []
        for item, _, example in rows:
            if item["id"] not in order:
                order[item["id"]] = len(unique)
                unique.append(example)
        size = self.batch_size
        padded = unique + [unique[-1]] * (size - len(unique))     # fixed rows: one compilation
        c = self.config
        batch = collate(padded, pad_id=self.pad_id, image_size=int(c.model.vision.image_size),
                        num_mel_bins=int(c.model.audio.num_mel_bins),
                        max_frames=int(c.data.max_frames), length_buckets=tuple(c.data.length_buckets))
        batch = {k: v for k, v in batch.items() if k not in HOST_ONLY}
        embeds, mask = spliced_inputs(self.task.model, self.encode_vars, batch)     # [size, L, H], [size, L]
        index = [order[item["id"]] for item, _, _ in rows]
        index += [index[-1]] * (size - len(index))
        index = jnp.asarray(index)
        keys = [row_key(self.seed, item["id"], sample) for item, sample, _ in rows]
        keys = jnp.stack(keys + [keys[-1]] * (size - len(keys)))
        out = generate(self.llm, self.llm_vars, inputs_embeds=embeds[index], attention_mask=mask[index],
                       keys=keys, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                       stop_ids=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh)
        out = to_host(out)   # every row on every process (rows may be sharded over hosts)
        tokens = out.token_lists()
        stopped, lengths = np.asarray(out.stopped), np.asarray(out.lengths)
        logprobs = np.asarray(out.logprobs).sum(axis=1)
        return [{"caption": self.tokenizer.decode(tokens[r], skip_special_tokens=True).strip(),
                 "stopped": bool(stopped[r]), "num_tokens": int(lengths[r]),
                 "logprob": float(logprobs[r])} for r in range(len(rows))]
