"""What mrDPO and rebirth need from a model besides the train step: caption videos, batch records.

`PolicyEnv` is the protocol (the AV model implements it over media files; `TextPolicyEnv` here is the
text-only Qwen2 version used by the fast tests). Items are caption records (id, prompt, events,
caption, video/audio); records are the data pipeline's kinds (preference, sft).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.training.host_batches import stop_together
from vsalmonn_jax.training.pairs import Sample
from vsalmonn_jax.training.prefetch import Prefetch
from vsalmonn_jax.training.task import present

MEDIA_EXAMPLE_KEYS = ("pixels", "frame_times", "mel", "audio_seconds", "has_video", "has_audio",
                      "time_ids", "time_mask")
MEDIA_BATCH_KEYS = ("pixel_values", "frame_mask", "frame_times", "mel", "mel_mask", "audio_seconds",
                    "has_video", "has_audio", "time_ids", "time_mask")


class PolicyEnv(Protocol):
    """task: the TaskModel the train steps run on (TextTask, the AV task, ...).

    generate(state, items, *, sampling, rng, max_new_tokens) -> one Sample per item, in order.
        Row g of `items` draws from a key that is a function of (rng, g) only (text: fold_in(rng,
        g)), so a caption does not depend on how the items are batched (sampling k per video = the
        items repeated k times).
    batches(records, *, batch_size, seed, shuffle, repeat) -> an iterator of host numpy batches (the
        batch contract: text fields per prefix, "example_id" = the record's position in `records`),
        with get_state() / set_state() so run_stage can checkpoint the position.
    """

    task: Any

    def generate(self, state, items: Sequence[Mapping], *, sampling: SamplingConfig,
                 rng: jax.Array, max_new_tokens: int) -> list[Sample]: ...

    def batches(self, records: Sequence[Mapping], *, batch_size: int, seed: int,
                shuffle: bool = True, repeat: bool = True) -> Iterator[dict]: ...


def policy_variables(state) -> dict:
    """{"params", "lora", "adapter"} of a TrainState, empty collections dropped (generation)."""
    return present({"params": state.params, **state.trainable})


def row_keys(rng: jax.Array, start: int, count: int) -> jax.Array:
    """Per-row sampling keys fold_in(rng, g) for global rows g in [start, start + count)."""
    return jax.vmap(lambda g: jax.random.fold_in(rng, g))(np.arange(start, start + count))


def sampling_item(item: Mapping) -> dict:
    """The caption item mrDPO / rebirth sample from: prompted as the pairs built from the samples
    (its "prompt", else the default: training/pairs.py), so release-form `conversations` go."""
    return {k: v for k, v in item.items() if k != "conversations"}


class ListIterator:
    """Endless (or one-pass) batches over a list of featurised examples; checkpointable position.

    Shuffled per epoch with a fixed seed; the last partial batch of a pass is padded by repeating
    its last example (one-pass mode), so every batch has `batch_size` rows."""

    def __init__(self, examples: list, collate_fn, batch_size: int, seed: int,
                 shuffle: bool, repeat: bool):
        if not examples:
            raise ValueError("no records to batch (the round produced no pairs?)")
        self.examples, self.collate_fn = examples, collate_fn
        self.batch_size, self.seed, self.shuffle, self.repeat = int(batch_size), seed, shuffle, repeat
        self.epoch, self.position = 0, 0
        self.rows = slice(None)   # which rows of each global batch to build (local_rows sets it)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([int(self.seed), epoch]).permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = len(self.examples)
        epoch, position = self.epoch, self.position
        if position >= n or (self.repeat and position + self.batch_size > n and n >= self.batch_size):
            if not self.repeat:
                raise StopIteration
            epoch, position = epoch + 1, 0
        order = self._order(epoch)
        index = list(order[position:position + self.batch_size])
        while len(index) < self.batch_size:   # pad (one-pass tail, or fewer records than a batch)
            index.append(index[-1] if not self.repeat else order[len(index) % n])
        batch = self.collate_fn([self.examples[int(i)] for i in index[self.rows]])
        # the position moves only once the batch exists: a stop signal raised while collating (the
        # AV collate builds the pixel arrays) leaves the state at this batch, which a resume redoes
        self.epoch, self.position = epoch, position + self.batch_size
        return batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class LocalRows:
    """This process's rows [start, stop) of every global batch of `iterator` (multi-host runs: each
    process builds the same global batch and keeps its own slice); state calls pass through."""

    def __init__(self, iterator, start: int, stop: int):
        self.iterator, self.start, self.stop = iterator, int(start), int(stop)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v[self.start:self.stop] for k, v in next(self.iterator).items()}

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def local_rows(iterator, mesh, batch_size: int):
    """`iterator` itself on one process, else this process's rows of it: a ListIterator builds only
    those (its collate may decode media), any other is sliced (LocalRows)."""
    if jax.process_count() == 1:
        return iterator
    from vsalmonn_jax.distributed import process_batch_rows

    start, stop = process_batch_rows(batch_size, mesh)
    if isinstance(iterator, ListIterator):
        iterator.rows = slice(start, stop)
        return iterator
    return LocalRows(iterator, start, stop)


def process_batches(env, records: Sequence[Mapping], mesh, batch_size: int, **kw) -> Prefetch:
    """`env.batches(...)`, this process's rows (local_rows), built ahead in a thread (Prefetch: the
    next batch's media decode while this one runs); `with process_batches(...) as batches:`."""
    return Prefetch(local_rows(env.batches(records, batch_size=batch_size, **kw), mesh, batch_size))


class TextPolicyEnv:
    """PolicyEnv of the text-only TextTask: prompts are ChatML user turns, no media.

    tokenizer: a transformers tokenizer with the ChatML specials (data/tokenizer_build.py).
    """

    def __init__(self, task, tokenizer, *, default_prompt: str = "Please describe the video in detail.",
                 sample_batch: int = 8, max_length: int = 32768, length_buckets: Sequence[int] = ()):
        from vsalmonn_jax.data.text import ENDOFTEXT, IM_END, token_id

        self.task, self.tokenizer = task, tokenizer
        self.default_prompt, self.sample_batch = default_prompt, int(sample_batch)
        self.max_length, self.length_buckets = int(max_length), tuple(length_buckets)
        self.stop_ids = (token_id(tokenizer, IM_END),)
        self.pad_id = token_id(tokenizer, ENDOFTEXT)

    # ---- generation
    def _prompt_ids(self, item: Mapping) -> np.ndarray:
        from vsalmonn_jax.data.text import encode_prompt

        return encode_prompt(self.tokenizer, item.get("prompt") or self.default_prompt,
                             has_media=False)

    def generate(self, state, items, *, sampling, rng, max_new_tokens):
        from vsalmonn_jax.data.collate import bucket_length
        from vsalmonn_jax.generate.decode import generate

        variables = policy_variables(state)
        out: list[Sample] = []
        for start in range(0, len(items), self.sample_batch):
            chunk = items[start:start + self.sample_batch]
            prompts = [self._prompt_ids(item) for item in chunk]
            rows = self.sample_batch   # fixed batch: one compile for every chunk
            length = bucket_length(max(len(p) for p in prompts), self.length_buckets)
            ids = np.full((rows, length), self.pad_id, np.int32)
            mask = np.zeros((rows, length), bool)
            for b in range(rows):
                p = prompts[min(b, len(prompts) - 1)]
                ids[b, :len(p)], mask[b, :len(p)] = p, True
            result = generate(self.task.model, variables, input_ids=ids, attention_mask=mask,
                              keys=row_keys(rng, start, rows), max_new_tokens=int(max_new_tokens),
                              sampling=sampling, stop_ids=self.stop_ids, pad_id=self.pad_id)
            out.extend(self._samples(result, len(chunk)))
        return out

    def _samples(self, result, count: int) -> list[Sample]:
        tokens = result.token_lists()
        stopped = np.asarray(result.stopped)
        lengths = np.asarray(result.lengths)
        logprobs = np.asarray(result.logprobs).sum(axis=1)
        return [Sample(text=self.tokenizer.decode(tokens[b], skip_special_tokens=True).strip(),
                       stopped=bool(stopped[b]), num_tokens=int(lengths[b]),
                       logprob=float(logprobs[b])) for b in range(count)]

    # ---- training batches
    def featurize(self, record: Mapping) -> dict:
        from vsalmonn_jax.data.example import text_fields
        from vsalmonn_jax.data.records import infer_kind

        record = dict(record)
        kind = record.get("kind") or infer_kind(record)
        fields = text_fields(dict(record, kind=kind), self.tokenizer, placeholder="<media>",
                             max_length=self.max_length, truncation="error",
                             default_prompt=self.default_prompt, has_media=False)
        fields.pop("has_pair", None)
        return fields

    def _collate(self, examples: list[dict], length_buckets: Sequence[int]) -> dict:
        from vsalmonn_jax.data.collate import collate

        batch = collate(examples, pad_id=self.pad_id, image_size=1, num_mel_bins=1, max_frames=1,
                        length_buckets=length_buckets)
        return {k: v for k, v in batch.items() if k not in MEDIA_BATCH_KEYS}

    def batches(self, records, *, batch_size, seed, shuffle=True, repeat=True):
        """All batches padded to one length (the bucket of the longest record): one compile."""
        from vsalmonn_jax.data.collate import TEXT_PREFIXES, bucket_length

        if not records:
            raise ValueError("no records to batch")
        examples = []
        for i, record in enumerate(records):
            example = self.featurize(record)
            example.update(example_id=np.int64(i), audio_seconds=np.float32(0.0),
                           has_video=np.bool_(False), has_audio=np.bool_(False))
            examples.append(example)
        longest = max((len(ex[p + "input_ids"]) for ex in examples for p in TEXT_PREFIXES
                       if p + "input_ids" in ex), default=1)
        length = bucket_length(longest, self.length_buckets)

        def collate_fixed(batch_examples):
            return self._collate(batch_examples, (length,))

        return ListIterator(examples, collate_fixed, batch_size, seed, shuffle, repeat)


class MediaCache:
    """Featurised examples of recently used clips by item id, least recently used dropped beyond
    `max_bytes` (their arrays' sizes): a round's clips are decoded for sampling and their pairs'
    batches reuse them, but a whole training set of decoded clips (~55 MB each at 110 frames)
    does not fit a host's memory. Thread-safe: batches are built ahead in a thread (Prefetch)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.items, self.bytes = int(max_bytes), {}, 0
        self._lock = threading.Lock()

    @staticmethod
    def size(example: Mapping) -> int:
        return sum(v.nbytes for v in example.values() if isinstance(v, np.ndarray))

    def get(self, key: str) -> dict | None:
        with self._lock:
            example = self.items.pop(key, None)
            if example is not None:
                self.items[key] = example   # now the most recent
            return example

    def put(self, key: str, example: dict) -> dict:
        with self._lock:
            if key in self.items:
                self.bytes -= self.size(self.items.pop(key))
            self.items[key] = example
            self.bytes += self.size(example)
            while self.bytes > self.max_bytes and self.items:
                self.bytes -= self.size(self.items.pop(next(iter(self.items))))
            return example


class AVPolicyEnv:
    """PolicyEnv of the audio-visual task (training/av_task.py) over media files.

    Generation goes through generate/captioner.py's AVCaptioner (frozen encoders -> connectors ->
    splice -> KV-cache decode); training batches through data/example.py's Featurizer and
    data/collate.py (the data pipeline's batch contract). Each item's media are decoded once and
    kept in a bounded cache (`prepared`, mrdpo.media_cache_gb), so a round's pairs and evaluations
    reuse them; training batches decode their rows when built, never a whole record set at once. An
    unreadable item raises, naming it (mrDPO items are the run's own clips: a broken one is a bug,
    not data noise).
    """

    def __init__(self, config, task, tokenizer, *, mesh=None, sample_batch: int = 8):
        from vsalmonn_jax.data.example import Featurizer

        self.config, self.task, self.tokenizer, self.mesh = config, task, tokenizer, mesh
        self.sample_batch = int(sample_batch)
        self.featurizer = Featurizer.from_config(config)
        self.featurizer._tokenizer = tokenizer
        gb = float(config.mrdpo.get("media_cache_gb", 4.0))
        self.prepared = MediaCache(int(gb * 2**30))

    def _captioner(self, state, sampling, seed: int, max_new_tokens: int):
        from vsalmonn_jax.generate.captioner import AVCaptioner

        # the state's own (device, possibly multi-host sharded) arrays: no host copy of the base
        return AVCaptioner(self.config, self.task, policy_variables(state),
                           self.tokenizer, sampling=sampling, max_new_tokens=int(max_new_tokens),
                           batch_size=self.sample_batch, seed=seed, mesh=self.mesh)

    def generate(self, state, items, *, sampling, rng, max_new_tokens):
        """Row g of `items` samples with key row_key(seed(rng), item id, g)."""
        seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
        captioner = self._captioner(state, sampling, seed, max_new_tokens)
        # rows grouped by item, a batch at a time: a clip's k samples sit side by side, decoded and
        # encoded once even when the cache cannot hold the round's clips; row g keeps its key
        first: dict[str, int] = {}
        for g, item in enumerate(items):
            first.setdefault(str(item["id"]), g)
        order = sorted(range(len(items)), key=lambda g: first[str(items[g]["id"])])
        out: list[Sample | None] = [None] * len(items)

        def prepared_batches():   # [(item, g, example)], the error that stopped the batch or None
            for start in range(0, len(order), captioner.batch_size):
                rows, batch = [], {}
                for g in order[start:start + captioner.batch_size]:
                    key = str(items[g]["id"])
                    try:
                        example = batch.get(key) or self.prepared.get(key) or self.prepared.put(
                            key, captioner.prepare(sampling_item(items[g])))
                    except Exception as err:   # noqa: BLE001 - every kind stops every process
                        yield rows, err
                        return
                    batch[key] = example
                    rows.append((items[g], g, example))
                yield rows, None

        # the next batch's clips decode while this one samples
        with Prefetch(prepared_batches(), depth=1) as ahead:
            for rows, error in ahead:
                stop_together(error, "decode the clips of a sampling batch")   # before its collectives
                for (_, g, _), result in zip(rows, captioner.caption(rows), strict=True):
                    out[g] = Sample(text=result["caption"], stopped=result["stopped"],
                                    num_tokens=result["num_tokens"], logprob=result["logprob"])
        return out

    def _reuse_media(self, record: dict) -> dict | None:
        """A record about an already-decoded clip (its `video_id` was captioned / sampled here):
        the clip's media features with the record's own text; None = featurise from the file."""
        prepared = self.prepared.get(str(record.get("video_id", "")))
        if prepared is None or prepared.get("video") != record.get("video") \
                or prepared.get("audio") != record.get("audio"):
            return None
        fields = self.featurizer.text(record, has_media=True)
        media = {k: prepared[k] for k in MEDIA_EXAMPLE_KEYS if k in prepared}
        fitted = self.featurizer.fit_media(record, {**media, **fields})   # as one from its file
        if "failed" in fitted:
            return fitted
        return {"example_id": np.int64(record["index"]), "id": record.get("id", ""), **media,
                **fields, **fitted}

    def batches(self, records, *, batch_size, seed, shuffle=True, repeat=True):
        """All batches padded to one text length (the bucket of the longest record). Records of
        clips this env already decoded (`video_id`) reuse those media features."""
        from vsalmonn_jax.data.collate import TEXT_PREFIXES, bucket_length, collate
        from vsalmonn_jax.data.records import infer_kind

        if not records:
            raise ValueError("no records to batch")
        records = [{**record, "kind": record.get("kind") or infer_kind(record), "index": i}
                   for i, record in enumerate(records)]
        longest = 0
        for record in records:   # the text of every record now (cheap); media when batched
            try:
                fields = self.featurizer.text(record, has_media=True)
            except ValueError as err:
                raise ValueError(f"record {record['index']} ({record.get('id', '?')}): {err}") from err
            longest = max([longest] + [len(fields[p + "input_ids"]) for p in TEXT_PREFIXES
                                       if p + "input_ids" in fields])
        length = bucket_length(longest, tuple(self.config.data.length_buckets))
        c = self.config

        def featurised(record: dict) -> dict:
            example = self._reuse_media(record) or self.featurizer(record)
            if "failed" in example:
                raise ValueError(f"record {record['index']} ({record.get('id', '?')}): "
                                 f"{example['failed']}: {example.get('detail', '')}")
            # not cached: the cache holds sampling's caption examples, whose text generate() uses
            return {k: v for k, v in example.items() if k != "has_pair"}

        def collate_fixed(batch_records):
            return collate([featurised(r) for r in batch_records],
                           pad_id=self.featurizer.tokenizer.pad_token_id or 0,
                           image_size=int(c.model.vision.image_size),
                           num_mel_bins=int(c.model.audio.num_mel_bins),
                           max_frames=int(c.data.max_frames), length_buckets=(length,))

        return ListIterator(records, collate_fixed, batch_size, seed, shuffle, repeat)
