"""Tiny synthetic text data (token ids, no tokenizer) and a checkpointable batch iterator.

Used by tests, the benchmark and `vsalmonn-jax train` with `--config.data.train=synthetic[:N]`
before / without the JSONL data pipeline. Batches follow the shared batch contract (text fields).
"""

from __future__ import annotations

import numpy as np


def _sequence(rng, vocab, prompt_len, response):
    prompt = rng.integers(3, vocab, size=prompt_len)
    ids = np.concatenate([prompt, response]).astype(np.int32)
    loss = np.zeros(len(ids), bool)
    loss[prompt_len:] = True
    return ids, loss


def _pad(rows: list[np.ndarray], length: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _pack(prefix: str, seqs: list[tuple[np.ndarray, np.ndarray]], length: int) -> dict:
    return {prefix + "input_ids": _pad([s[0] for s in seqs], length, np.int32),
            prefix + "attention_mask": _pad([np.ones(len(s[0]), bool) for s in seqs], length, bool),
            prefix + "loss_mask": _pad([s[1] for s in seqs], length, bool)}


def sft_examples(num: int, vocab: int, length: int = 16, seed: int = 0) -> dict:
    """`num` prompt + response sequences (random lengths, right-padded to `length`), loss on responses."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num):
        total = int(rng.integers(length // 2, length + 1))
        prompt_len = int(rng.integers(2, total // 2 + 1))
        seqs.append(_sequence(rng, vocab, prompt_len, rng.integers(3, vocab, size=total - prompt_len)))
    out = _pack("", seqs, length)
    out["example_id"] = np.arange(num, dtype=np.int64)
    return out


def dpo_examples(num: int, vocab: int, length: int = 16, seed: int = 0, with_gt: bool = True) -> dict:
    """Preference pairs sharing a prompt: chosen / rejected responses differ; gt = chosen."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for _ in range(num):
        prompt_len = int(rng.integers(2, length // 2))
        resp_len = length - prompt_len
        prompt = rng.integers(3, vocab, size=prompt_len)
        for bucket in (chosen, rejected):
            ids = np.concatenate([prompt, rng.integers(3, vocab, size=resp_len)]).astype(np.int32)
            loss = np.zeros(length, bool)
            loss[prompt_len:] = True
            bucket.append((ids, loss))
    out = {**_pack("chosen_", chosen, length), **_pack("rejected_", rejected, length)}
    if with_gt:
        out.update(_pack("gt_", chosen, length))
    out["example_id"] = np.arange(num, dtype=np.int64)
    return out


class ArrayIterator:
    """Endless batches from a dict of equal-length arrays: reshuffled per epoch with a fixed seed.

    `get_state()` / `set_state()` (JSON-able dicts) make it resumable like a grain iterator.
    """

    def __init__(self, data: dict, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.data = data
        self.num = len(next(iter(data.values())))
        if batch_size > self.num:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num} examples")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position + self.batch_size > self.num:
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[index] for k, v in self.data.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
