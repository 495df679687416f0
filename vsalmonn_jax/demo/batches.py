"""Demo examples and fixed-shape batches: token rows (ChatML, assistant-only loss) joined with the
cached media of their clip. Every batch has the same shapes, so each stage compiles its step once.
"""

from __future__ import annotations

import numpy as np

from vsalmonn_jax.data import text as text_lib

MODALITIES = {"av": ("vision", "audio"), "video": ("vision",), "audio": ("audio",)}


class Tokens:
    """Encodes prompts (generation, <= max_prompt) and prompt + response rows (training, cut at
    `length` = max_text tokens) to fixed-length rows."""

    def __init__(self, tokenizer, placeholder: str, prompt: str, max_prompt: int, max_caption: int,
                 max_text: int):
        self.tokenizer = tokenizer
        self.placeholder = placeholder
        self.prompt = prompt
        self.max_prompt, self.max_caption = max_prompt, max_caption
        self.length = max_text
        self.placeholder_id = text_lib.token_id(tokenizer, placeholder)
        self.stop_ids = (text_lib.token_id(tokenizer, text_lib.IM_END),)
        self.pad_id = text_lib.token_id(tokenizer, text_lib.ENDOFTEXT)

    def prompt_row(self, user: str | None = None) -> np.ndarray:
        ids = text_lib.encode_prompt(self.tokenizer, user or self.prompt, placeholder=self.placeholder)
        if len(ids) > self.max_prompt:
            raise ValueError(f"prompt is {len(ids)} tokens > demo.max_prompt_tokens {self.max_prompt}")
        return ids

    def response_row(self, response: str, user: str | None = None, has_media: bool = True,
                     ended: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss_mask); a response over the budget is cut (its end token is then lost).
        has_media=False: a text-only row (no placeholder); ended=False: no closing end token."""
        ids, mask = text_lib.encode_response(self.tokenizer, user or self.prompt, response,
                                             ended=ended, placeholder=self.placeholder,
                                             has_media=has_media)
        return ids[: self.length], mask[: self.length]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def pad_rows(rows: list[np.ndarray], length: int, value, dtype) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row[:length]
    return out


def text_batch(rows: list[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int,
               prefix: str = "") -> dict[str, np.ndarray]:
    """[(ids, loss_mask)] -> {prefix+input_ids, prefix+attention_mask, prefix+loss_mask} [B, length]."""
    ids = [r[0] for r in rows]
    return {prefix + "input_ids": pad_rows(ids, length, pad_id, np.int32),
            prefix + "attention_mask": pad_rows([np.ones(len(i), bool) for i in ids], length, False, bool),
            prefix + "loss_mask": pad_rows([r[1] for r in rows], length, False, bool)}


def media_batch(media: dict[str, np.ndarray], rows: np.ndarray, modality: str | list[str],
                fields: str | None = None) -> dict[str, np.ndarray]:
    """Cached encoder outputs of clips `rows`: `modality` (av | video | audio) for every row, or
    one per row; the batch carries the features of `fields` (default: every modality a row uses)
    and each row's has_video / has_audio say what it uses. With time tokens when the media carry
    them (demo/data.add_time_tokens): rows that use audio keep them where time_with_audio says so."""
    n = len(rows)
    per_row = [modality] * n if isinstance(modality, str) else list(modality)
    has_video = np.asarray(["vision" in MODALITIES[m] for m in per_row], bool)
    has_audio = np.asarray(["audio" in MODALITIES[m] for m in per_row], bool)
    carried = MODALITIES[fields] if fields else (("vision",) * bool(has_video.any())
                                                 + ("audio",) * bool(has_audio.any()))
    out = {"has_video": has_video, "has_audio": has_audio}
    if "vision" in carried:
        out.update(vision=media["vision"][rows], frame_mask=media["frame_mask"][rows],
                   frame_times=media["frame_times"][rows])
        if "time_ids" in media:
            timed = media["time_with_audio"][rows] | ~has_audio   # [n]
            out.update(time_ids=media["time_ids"][rows],
                       time_mask=media["time_mask"][rows] & timed[:, None, None])
    if "audio" in carried:
        out.update(audio=media["audio"][rows], audio_seconds=media["audio_seconds"][rows])
    return out


class ExampleIterator:
    """Endless seeded shuffled batches over SFT examples {"split", "row", "text": (ids, mask)}.

    `media` maps split -> cached arrays; batches carry `modality`'s features, an example's own
    "modality" (video | audio within "av") says which of them its row uses; an example with
    "media": False is a text-only row (its media flags are off, no placeholder).
    """

    def __init__(self, examples: list[dict], media: dict[str, dict], *, batch_size: int, length: int,
                 pad_id: int, modality: str, seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.media = examples, media
        self.batch_size, self.length, self.pad_id = batch_size, length, pad_id
        self.modality = modality
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(examples)), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        picked = []
        while len(picked) < self.batch_size:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.examples)), 0
            picked.append(self.examples[self.order[self.pos]])
            self.pos += 1
        return build_batch(picked, self.media, self.length, self.pad_id, self.modality)


def build_batch(examples: list[dict], media: dict[str, dict], length: int, pad_id: int,
                modality: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, np.ndarray]:
    """One batch of examples; an example's "modality" (default `modality`) picks the media it
    uses, and the batch carries `modality`'s features."""
    splits = {e["split"] for e in examples}
    uses = [e.get("modality", modality) for e in examples]
    if len(splits) != 1:   # media rows come from one split's arrays
        batch_media = [media_batch(media[e["split"]], np.asarray([e["row"]]), m, fields=modality)
                       for e, m in zip(examples, uses, strict=True)]
        joined = {k: np.concatenate([m[k] for m in batch_media]) for k in batch_media[0]}
    else:
        joined = media_batch(media[splits.pop()], np.asarray([e["row"] for e in examples]), uses,
                             fields=modality)
    batch = dict(joined)
    text_only = np.asarray([not e.get("media", True) for e in examples])
    for flag in ("has_video", "has_audio"):
        batch[flag] = batch[flag] & ~text_only
    for prefix in prefixes:
        key = prefix.rstrip("_") or "text"
        batch.update(text_batch([e[key] for e in examples], length, pad_id, prefix))
    return batch
