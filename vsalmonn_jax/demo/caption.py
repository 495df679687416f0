"""Captioning and QA with the demo model: splice cached media into the prompt, then the project's
KV-cache generator (generate/decode.py); scoring with the exact judge; QA by option scoring, the
options of a question packed after their one shared prompt + media (training/packing.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.data.event_qa import event_qa_prompt
from vsalmonn_jax.demo.batches import media_batch, pad_rows, text_batch
from vsalmonn_jax.eval import aggregate, collapse_repeats, get_judge, repetition_stats
from vsalmonn_jax.eval.qa import qa_accuracy
from vsalmonn_jax.generate.decode import generate
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.models.qwen2 import Qwen2
from vsalmonn_jax.training import packing
from vsalmonn_jax.training.losses import sequence_logps, token_logps
from vsalmonn_jax.training.pairs import sentence_count

_SPLICE: dict = {}   # one jitted splice per task object (stages reuse the compilation)
_SCORE: dict = {}    # ... one jitted response scorer
_OPTIONS: dict = {}  # ... and one jitted option scorer (per option count)


def response_logps(task, variables: dict, text: dict, media: dict):
    """Summed log p(response | prompt, media) per row: text [B, T] rows -> [B] fp32."""
    media = task.encode(variables, media)   # as training reads a batch (fp16 features -> fp32)
    hidden, targets, mask = task.forward(variables, text, media, deterministic=True, rngs=None)
    return sequence_logps(token_logps(task.logits(variables, hidden), targets), mask)


def option_logps(task, n_options: int, variables: dict, packed: dict, media: dict):
    """Summed log p(option k | prompt, media) of packed rows [B, L] (prompt | option 1 | ... ;
    branch_ids 0 | 1 | ...) -> [B, n_options] fp32: the prompt and the media go through the LLM once
    per question instead of once per option."""
    out = task.forward_packed(variables, packed, task.encode(variables, media), deterministic=True,
                              rngs=None)
    hidden, targets, mask, branch = packing.align(out)
    logps = jnp.where(mask, token_logps(task.logits(variables, hidden), targets), 0.0)   # [B, L]
    onehot = branch[..., None] == jnp.arange(1, n_options + 1)                          # [B, L, n]
    return jnp.einsum("bl,bln->bn", logps, onehot.astype(logps.dtype))


def pack_options(options: list[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One question's (ids, loss_mask) rows, identical up to their first target token -> one packed
    row (ids, loss_mask, branch_ids): the shared prompt once, then each option's target tokens."""
    first = [int(np.argmax(m)) if m.any() else len(m) for _, m in options]
    n = first[0]
    prompt = options[0][0][:n]
    if any(f != n or not np.array_equal(ids[:n], prompt) for f, (ids, _) in zip(first, options)):
        raise ValueError("the options of a question must share their prompt (the tokens before "
                         "the answer)")
    ids = [prompt] + [i[n:] for i, _ in options]
    loss = [np.zeros(n, bool)] + [m[n:] for _, m in options]
    branch = [np.zeros(n, np.int32)] + [np.full(len(i) - n, k, np.int32)
                                        for k, (i, _) in enumerate(options, start=1)]
    return np.concatenate(ids), np.concatenate(loss), np.concatenate(branch)


class Captioner:
    """Generation for one model snapshot {"params", "adapter", "lora"} (lora may be None)."""

    def __init__(self, task, tokens, variables: dict, modality: str = "av"):
        self.task, self.tokens, self.modality = task, tokens, modality
        self.variables = {k: v for k, v in variables.items() if v}
        lora = self.variables.get("lora")
        self.llm = Qwen2(task.cfg.llm, lora=task.model.lora if lora else None)
        self.llm_vars = {"params": self.variables["params"]["llm"],
                         **({"lora": lora["llm"]} if lora else {})}
        if id(task) not in _SPLICE:
            _SPLICE[id(task)] = jax.jit(task.spliced)
        self._splice = _SPLICE[id(task)]

    def run(self, media: dict, rows: np.ndarray, prompts: list[np.ndarray], *, batch: int,
            max_new_tokens: int, sampling: SamplingConfig, rng: jax.Array | None = None,
            keys: jax.Array | None = None, details: bool = False) -> list[tuple]:
        """(text, stopped) per row (details: + (num_tokens, summed logprob)); batches are padded to
        `batch` rows (one compilation). Randomness: `keys` [N] one key per row (the output does not
        depend on batching), else `rng` folded with each batch's start."""
        out = []
        for start in range(0, len(rows), batch):
            part = np.arange(start, min(start + batch, len(rows)))
            take = np.resize(part, batch)   # wrap-pad the last batch
            text = text_batch([(prompts[i], np.zeros(len(prompts[i]), bool)) for i in take],
                              self.tokens.max_prompt, self.tokens.pad_id)
            spliced = self._splice(self.variables, text, media_batch(media, rows[take], self.modality))
            randomness = ({"keys": keys[take]} if keys is not None
                          else {"rng": jax.random.fold_in(rng, start)})
            result = generate(self.llm, self.llm_vars, inputs_embeds=spliced["inputs_embeds"],
                              attention_mask=spliced["attention_mask"], **randomness,
                              max_new_tokens=max_new_tokens, sampling=sampling,
                              stop_ids=self.tokens.stop_ids, pad_id=self.tokens.pad_id)
            stopped = np.asarray(result.stopped)
            lengths, logprobs = np.asarray(result.lengths), np.asarray(result.logprobs).sum(axis=1)
            for k, ids in enumerate(result.token_lists()[: len(part)]):
                row = (self.tokens.decode(ids), bool(stopped[k]))
                out.append(row + (int(lengths[k]), float(logprobs[k])) if details else row)
        return out

    def captions(self, split: dict, *, batch: int, max_new_tokens: int, sampling=None, rng=None,
                 rows: np.ndarray | None = None, repeats: int = 1) -> list[tuple[str, bool]]:
        """Captions of a split's clips (`repeats` samples each, clip-major)."""
        rows = np.arange(len(split["items"])) if rows is None else np.asarray(rows)
        rows = np.repeat(rows, repeats)
        prompt = self.tokens.prompt_row()
        return self.run(split["media"], rows, [prompt] * len(rows), batch=batch,
                        max_new_tokens=max_new_tokens, sampling=sampling or SamplingConfig(),
                        rng=jax.random.PRNGKey(0) if rng is None else rng)

    def response_logps(self, media: dict, rows: np.ndarray, texts: list[tuple[np.ndarray, np.ndarray]],
                       *, batch: int) -> np.ndarray:
        """Summed log-probability of each (ids, loss_mask) row's response given its prompt and clip
        `rows[i]`'s media: [N] float (teacher forcing; batches wrap-padded to `batch` rows)."""
        if id(self.task) not in _SCORE:
            _SCORE[id(self.task)] = jax.jit(functools.partial(response_logps, self.task))
        out = np.zeros(len(rows), np.float64)
        for start in range(0, len(rows), batch):
            part = np.arange(start, min(start + batch, len(rows)))
            take = np.resize(part, batch)
            text = text_batch([texts[i] for i in take], self.tokens.length, self.tokens.pad_id)
            scores = _SCORE[id(self.task)](self.variables, text, media_batch(media, rows[take], self.modality))
            out[part] = np.asarray(scores)[: len(part)]
        return out

    def option_logps(self, media: dict, rows: np.ndarray,
                     questions: list[list[tuple[np.ndarray, np.ndarray]]], *, batch: int
                     ) -> list[np.ndarray]:
        """Per question (its options' (ids, loss_mask) rows, clip `rows[i]`), each option's summed
        log-probability given the prompt and the clip, as `response_logps` scores them one row each,
        from one packed row per question (`pack_options`; width = the Tokens length, or wider when a
        question's options do not fit). Batches wrap-padded to `batch` rows."""
        n_options = max(len(q) for q in questions)
        packed = [pack_options(q) for q in questions]
        width = max([self.tokens.length] + [len(ids) for ids, _, _ in packed])
        key = (id(self.task), n_options)
        if key not in _OPTIONS:
            _OPTIONS[key] = jax.jit(functools.partial(option_logps, self.task, n_options))
        out = np.zeros((len(rows), n_options), np.float64)
        for start in range(0, len(rows), batch):
            part = np.arange(start, min(start + batch, len(rows)))
            take = np.resize(part, batch)
            text = text_batch([packed[i][:2] for i in take], width, self.tokens.pad_id)
            text["branch_ids"] = pad_rows([packed[i][2] for i in take], width, 0, np.int32)
            scores = _OPTIONS[key](self.variables, text,
                                   media_batch(media, rows[take], self.modality))
            out[part] = np.asarray(scores)[: len(part)]
        return [out[i, :len(q)] for i, q in enumerate(questions)]

    def answers(self, split: dict, *, batch: int) -> tuple[list[dict], dict[str, str]]:
        """(questions, predictions) for every QA item of the split: option scoring, the option whose
        sentence is likeliest as the answer (data/event_qa.py) is predicted, as its letter."""
        questions, rows, options = [], [], []
        for r, item in enumerate(split["items"]):
            for k, qa in enumerate(item["qa"]):
                questions.append({"id": f"{item['id']}_qa{k}", **qa})
                user = event_qa_prompt(qa["question"], qa["options"])
                rows.append(r)
                options.append([self.tokens.response_row(option, user) for option in qa["options"]])
        logps = self.option_logps(split["media"], np.asarray(rows, np.int64), options, batch=batch)
        # ties go to the first option (a model blind to the text: always "A")
        predictions = {q["id"]: chr(65 + int(np.argmax(s)))
                       for q, s in zip(questions, logps, strict=True)}
        return questions, predictions


def judged(text: str, stopped: bool) -> str:
    return text if stopped else collapse_repeats(text)


def score_captions(items: list[dict], captions: list[tuple[str, bool]]) -> dict:
    """Exact-judge scores + aggregate + repetition + length (sentences of the judged captions, true
    events) for one split's captions."""
    judge = get_judge("exact")
    texts = [judged(t, s) for t, s in captions]
    scores = judge.score_many([(t, it["events"]) for it, t in zip(items, texts, strict=True)],
                              ids=[it["id"] for it in items])
    return {"aggregate": aggregate(scores),
            "length": {"captions": len(texts), "sentences": sum(sentence_count(t) for t in texts),
                       "events": sum(s.num_events for s in scores)},   # the report's diagnostics
            "repetition": repetition_stats([t for t, _ in captions], [s for _, s in captions]),
            "per_video": [{"id": s.id, "n": s.num_events, "missed": s.missed,
                           "incorrect": s.incorrect, "hallucinated": s.hallucinated} for s in scores]}


def evaluate_model(captioner: Captioner, split: dict, *, batch: int, max_new_tokens: int) -> dict:
    captions = captioner.captions(split, batch=batch, max_new_tokens=max_new_tokens)
    result = score_captions(split["items"], captions)
    questions, predictions = captioner.answers(split, batch=batch)
    qa = qa_accuracy(questions, predictions)
    result["qa"] = {"n": qa["n"], "correct": qa["correct"], "accuracy": qa["accuracy"],
                    "unanswered": len(qa["unanswered_ids"])}
    result["captions"] = [{"id": it["id"], "caption": t, "stopped": s}
                          for it, (t, s) in zip(split["items"], captions, strict=True)]
    return result
