"""The demo's PolicyEnv (training/policy_env.py) over cached encoder outputs: mrDPO samples captions
and trains on its pair / control records through the clip ids, never touching a media file again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from vsalmonn_jax.data.records import infer_kind
from vsalmonn_jax.demo.batches import Tokens, build_batch
from vsalmonn_jax.demo.caption import Captioner
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.pairs import Sample
from vsalmonn_jax.training.policy_env import ListIterator, policy_variables, row_keys

TEXT_KEYS = ("chosen", "rejected", "gt", "text")   # an example's token rows (build_batch prefixes)


class DemoPolicyEnv:
    """PolicyEnv of the demo's CachedAVTask. Items are the demo's clip items (id, events, caption);
    records name their clip by `video_id` (build_pairs / control_records); both reach the clip's
    cached encoder outputs through `splits` = {split: {"items", "media"}} (demo/data.py)."""

    def __init__(self, task, tokens: Tokens, splits: Mapping[str, dict], *, sample_batch: int):
        self.task, self.tokens, self.sample_batch = task, tokens, int(sample_batch)
        self.media = {name: split["media"] for name, split in splits.items()}
        self.where = {str(item["id"]): (name, row) for name, split in splits.items()
                      for row, item in enumerate(split["items"])}

    def locate(self, clip_id) -> tuple[str, int]:
        """(split, row) of a clip id."""
        if str(clip_id) not in self.where:
            raise KeyError(f"clip {clip_id!r} is in none of the demo's splits ({sorted(self.media)})")
        return self.where[str(clip_id)]

    # ---- generation
    def generate(self, state, items: Sequence[Mapping], *, sampling, rng, max_new_tokens):
        """One Sample per item; row g samples with key fold_in(rng, g), whatever the batching."""
        captioner = Captioner(self.task, self.tokens, policy_variables(state))
        keys = np.asarray(row_keys(rng, 0, len(items)))                 # uint32 [N, 2]
        places = [self.locate(item["id"]) for item in items]
        out: list[Sample] = [Sample(text="")] * len(items)
        for split in dict.fromkeys(split for split, _ in places):      # splits in order of use
            index = [g for g, (s, _) in enumerate(places) if s == split]
            prompts = [self.tokens.prompt_row(items[g].get("prompt")) for g in index]
            texts = captioner.run(self.media[split], np.asarray([places[g][1] for g in index]),
                                  prompts, batch=self.sample_batch, max_new_tokens=int(max_new_tokens),
                                  sampling=sampling, keys=keys[index])
            for g, (text, stopped) in zip(index, texts, strict=True):
                out[g] = Sample(text=text, stopped=stopped)
        return out

    # ---- training batches
    def example(self, record: Mapping, index: int) -> dict:
        """A preference record -> {"chosen", "rejected"[, "gt"]} token rows, an SFT record (the
        control arm's prompt -> GT caption) -> {"text"}; plus the clip's split / row."""
        split, row = self.locate(record.get("video_id", record.get("id")))
        out = {"split": split, "row": row, "example_id": int(index)}
        kind = record.get("kind") or infer_kind(record)
        if kind == "preference":
            for key in ("chosen", "rejected", "gt"):
                if record.get(key) is not None:
                    out[key] = self.tokens.response_row(
                        record[key], record.get("prompt"), ended=record.get(f"{key}_stopped") is not False)
        elif kind == "sft":
            turns = {turn["role"]: turn["content"] for turn in record["conversations"]}
            out["text"] = self.tokens.response_row(turns["assistant"], turns.get("user"))
        else:
            raise ValueError(f"record {index} ({record.get('id', '?')}): kind {kind!r}; the demo "
                             "trains on preference and sft records")
        return out

    def batches(self, records: Sequence[Mapping], *, batch_size, seed, shuffle=True, repeat=True):
        """Fixed-shape batches (demo.max_text_tokens) of one record kind; checkpointable position."""
        if not records:
            raise ValueError("no records to batch (the round produced no pairs?)")
        examples = [self.example(record, i) for i, record in enumerate(records)]
        if any("gt" in e for e in examples):   # a pair whose clip has no GT caption (an annotator
            for e in examples:                 # wrote nothing): an empty GT row, no CE term, as
                if "chosen" in e:              # data/example.py does for such records
                    e.setdefault("gt", (np.zeros((0,), np.int32), np.zeros((0,), bool)))
        keys = [k for k in TEXT_KEYS if k in examples[0]]
        odd = [e["example_id"] for e in examples if [k for k in TEXT_KEYS if k in e] != keys]
        if odd:
            raise ValueError(f"records {odd[:5]} have other text fields than record 0's {keys}: "
                             "one batch stream takes one record layout")
        prefixes = tuple("" if k == "text" else k + "_" for k in keys)

        def collate(rows: list[dict]) -> dict:
            batch = build_batch(rows, self.media, self.tokens.length, self.tokens.pad_id, "av",
                                prefixes)
            batch["example_id"] = np.asarray([r["example_id"] for r in rows], np.int64)   # [B]
            return batch

        return ListIterator(examples, collate, batch_size, seed, shuffle, repeat)


def policy_state(task, config, model: dict, mesh, seed: int) -> st.TrainState:
    """A demo model {"params", "adapter", "lora"} as the TrainState run_mrdpo starts from, placed
    with the train shardings of `config` (optimizer and DPO reference are left to run_stage)."""
    tx, _ = st.make_optimizer(config.train, 1)
    _, shardings = st.state_shardings(task, config, tx, mesh)
    trainable = {"lora": model["lora"], "adapter": model["adapter"]}
    return st.TrainState(
        step=np.zeros((), np.int32), params=jax.device_put(model["params"], shardings.params),
        trainable=jax.device_put(trainable, shardings.trainable), opt_state=None,
        rng=jax.device_put(jax.random.PRNGKey(int(seed)), shardings.rng), ref_adapter={})


def policy_model(state: st.TrainState) -> dict:
    """The demo model {"params", "adapter", "lora"} (host numpy) of a TrainState."""
    host = jax.device_get({"params": state.params, **state.trainable})
    return {"params": host["params"], "adapter": host["adapter"], "lora": host.get("lora")}
