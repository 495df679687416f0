"""Config validation before any model is built: ONE table (`RULES`) of allowed values / ranges per
field and ONE function (`validate`) that every command calls right after loading its config.

Add a field by adding a line to `RULES`; fields not in the table (or not in a config) are not checked.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

# the allowed values live beside the code that acts on them; the table only points at them
from vsalmonn_jax.data.annotator import ANNOTATOR_KINDS
from vsalmonn_jax.data.annotator import KINDS as EVENT_KINDS
from vsalmonn_jax.data.media import AUDIO_CUTS, CHANNEL_MODES, FRAME_SAMPLING, VIDEO_AUDIO
from vsalmonn_jax.data.synthetic_scene import VISUAL_KINDS
from vsalmonn_jax.data.text import PROMPT_FORMATS
from vsalmonn_jax.data.time_tokens import TIME_TOKEN_MODES
from vsalmonn_jax.models.attention import IMPLS as ATTENTION_IMPLS
from vsalmonn_jax.models.av_llm import INTERLEAVE_MODES
from vsalmonn_jax.models.connectors import NEWLINE_MODES, POOL_MODES
from vsalmonn_jax.models.qwen2 import REMAT_NAMES, REMAT_POLICIES
from vsalmonn_jax.training.pairs import UNFINISHED


class ConfigError(ValueError):
    """One or more config fields hold values the code cannot run with; one line per field."""


@dataclasses.dataclass(frozen=True)
class OneOf:
    values: tuple

    def problem(self, value) -> str | None:
        if value in self.values:
            return None
        return f"allowed: {' | '.join(map(str, self.values))}"


@dataclasses.dataclass(frozen=True)
class Number:
    """A number in [low, high] (`open_low` / `open_high` exclude the bound); `integer` for ints;
    `also` lists extra allowed values (e.g. -1 = all remaining devices)."""
    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    also: tuple = ()

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if math.isinf(self.high):
            bounds = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            bounds = (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                      f"{')' if self.open_high else ']'}")
        extra = f" (or {', '.join(map(str, self.also))})" if self.also else ""
        return f"{kind} {bounds}{extra}"

    def problem(self, value) -> str | None:
        if value in self.also and not isinstance(value, bool):
            return None
        numeric = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not numeric or (isinstance(value, float) and math.isnan(value)):
            return f"allowed: {self.describe()}"
        if value < self.low or (self.open_low and value == self.low) or value > self.high \
                or (self.open_high and value == self.high):
            return f"allowed: {self.describe()}"
        return None


@dataclasses.dataclass(frozen=True)
class SubsetOf:
    """A list / tuple whose every item is one of `values`, holding each of `required`."""
    values: tuple
    required: tuple = ()

    def problem(self, value) -> str | None:
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if all(item in self.values for item in items) and all(item in items for item in self.required):
            return None
        must = f" including {' and '.join(map(str, self.required))}" if self.required else ""
        return f"allowed: a list of {' | '.join(map(str, self.values))}{must}"


@dataclasses.dataclass(frozen=True)
class LocalPath:
    """A path this process opens with the file system: not a URL (gs://...), which every run file
    (config.json, metrics, checkpoints) would take as a local folder named "gs:"."""

    def problem(self, value) -> str | None:
        if isinstance(value, str) and "://" not in value:
            return None
        return ("allowed: a path on a file system (URLs such as gs://BUCKET/... are not supported "
                "yet: mount the bucket, e.g. with gcsfuse, at one path on every host)")


POSITIVE_INT = Number(low=1, integer=True)
COUNT = Number(low=0, integer=True)            # 0 allowed (usually "off" / "all" / "default")
POSITIVE = Number(low=0, open_low=True)
NON_NEGATIVE = Number(low=0)
PROBABILITY = Number(low=0, high=1)
SHARE_BELOW_ONE = Number(low=0, high=1, open_high=True)
TOP_P = Number(low=0, high=1, open_low=True)
COSINE = Number(low=-1, high=1)
MESH_AXIS = Number(low=1, integer=True, also=(-1,))
DTYPES = OneOf(("float32", "bfloat16", "float16"))
BOOL = OneOf((True, False))

# field -> rule; the fix printed is "set --config.<field>=<one of the allowed values>"
RULES: dict[str, Any] = {
    "stage": OneOf(("align", "sft", "dpo", "mrdpo", "rebirth")),
    "workdir": LocalPath(),
    # ---- model ----
    "model.llm.dtype": DTYPES,
    "model.llm.param_dtype": DTYPES,
    "model.llm.remat_policy": OneOf(("none", *REMAT_POLICIES)),
    "model.llm.remat_names": SubsetOf(REMAT_NAMES),
    "model.llm.attention_impl": OneOf(ATTENTION_IMPLS),
    "model.llm.attention_block": POSITIVE_INT,
    "model.lora.rank": POSITIVE_INT,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": SHARE_BELOW_ONE,
    "model.vision.frame_chunk": COUNT,         # 0 = all frames at once
    "model.vision.position_init_std": POSITIVE,
    "model.audio.chunk_batch": COUNT,          # 0 = all chunks at once
    "model.connector.pool_mode": OneOf(POOL_MODES),
    "model.connector.pool_stride": POSITIVE_INT,
    "model.connector.newline": OneOf(NEWLINE_MODES),
    "model.connector.interleave": OneOf(INTERLEAVE_MODES),
    "model.connector.cell_embedding": BOOL,
    "model.qformer.dropout": SHARE_BELOW_ONE,
    # ---- data ----
    "data.fps": POSITIVE,
    "data.max_frames": POSITIVE_INT,
    "data.sample_rate": POSITIVE_INT,
    "data.min_audio_seconds": NON_NEGATIVE,
    "data.missing_audio": OneOf(("silence", "error")),
    "data.audio_channel": OneOf(CHANNEL_MODES),
    "data.frame_sampling": OneOf(FRAME_SAMPLING),
    "data.audio_cut": OneOf(AUDIO_CUTS),
    "data.video_audio": OneOf(VIDEO_AUDIO),
    "data.prompt_format": OneOf(PROMPT_FORMATS),
    "data.time_tokens": OneOf(TIME_TOKEN_MODES),
    "data.max_length": POSITIVE_INT,
    "data.truncation": OneOf(("error", "truncate_response")),
    "data.batch_size": POSITIVE_INT,
    "data.num_workers": COUNT,
    "data.max_failure_share": PROBABILITY,
    "data.synthetic.visual_kinds": SubsetOf(VISUAL_KINDS, required=("appears",)),
    # ---- optimisation ----
    "train.lr": POSITIVE,
    "train.warmup_ratio": PROBABILITY,
    "train.schedule": OneOf(("cosine", "linear", "constant")),
    "train.weight_decay": NON_NEGATIVE,
    "train.b1": SHARE_BELOW_ONE,
    "train.b2": SHARE_BELOW_ONE,
    "train.eps": POSITIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.grad_accum": POSITIVE_INT,
    "train.num_steps": POSITIVE_INT,
    "train.epochs": COUNT,
    "train.log_every": POSITIVE_INT,
    "train.eval_every": POSITIVE_INT,
    "train.checkpoint_every": POSITIVE_INT,
    "train.keep_checkpoints": POSITIVE_INT,
    "train.on_nan": OneOf(("stop", "skip")),
    "train.logits_chunk": COUNT,
    "dpo.beta": POSITIVE,
    "dpo.loss_type": OneOf(("sigmoid", "ipo")),
    "dpo.label_smoothing": Number(low=0, high=0.5),
    "dpo.gt_ce_weight": NON_NEGATIVE,
    "dpo.gt_ce_mean": OneOf(("tokens", "rows")),
    "dpo.reference": OneOf(("snapshot", "lora_disabled")),
    "dpo.precompute_reference": BOOL,
    "dpo.shared_prefix": BOOL,
    "mrdpo.rounds": POSITIVE_INT,
    "mrdpo.steps_per_round": POSITIVE_INT,
    "mrdpo.samples_per_video": Number(low=2, integer=True),
    "mrdpo.pair_rule": OneOf(("total", "miss_weighted", "dominance")),
    "mrdpo.pair_mode": OneOf(("best_worst", "all")),
    "mrdpo.judge": OneOf(("exact", "embedding", "llm")),
    "mrdpo.miss_weight": NON_NEGATIVE,
    "mrdpo.min_margin": NON_NEGATIVE,
    "mrdpo.max_length_gap": Number(low=-1, integer=True),   # -1 = off
    "mrdpo.top_p": TOP_P,
    "mrdpo.temperature": POSITIVE,
    "mrdpo.top_k": COUNT,
    "mrdpo.max_new_tokens": COUNT,
    "mrdpo.videos_per_round": COUNT,
    "mrdpo.batch_size": COUNT,
    "mrdpo.sample_batch": POSITIVE_INT,
    "mrdpo.media_cache_gb": NON_NEGATIVE,
    "mrdpo.unfinished": OneOf(UNFINISHED),
    "rebirth.non_caption_ratio": SHARE_BELOW_ONE,
    "rebirth.num_steps": COUNT,
    # ---- generation / evaluation ----
    "generate.max_new_tokens": POSITIVE_INT,
    "generate.temperature": POSITIVE,
    "generate.top_p": TOP_P,
    "generate.top_k": COUNT,
    "generate.repetition_penalty": POSITIVE,
    "generate.decode_layout": OneOf(("auto", "gathered", "train")),
    "train.ce_mean": OneOf(("tokens", "rows")),
    "eval.judge": OneOf(("exact", "embedding", "llm")),
    "eval.passes": POSITIVE_INT,
    "eval.llm_concurrency": POSITIVE_INT,
    "eval.llm_max_retries": COUNT,
    "eval.llm_fallback_retries": COUNT,
    "eval.llm_backoff_s": NON_NEGATIVE,
    "eval.llm_timeout_s": POSITIVE,
    "eval.embedding_match_threshold": COSINE,
    "eval.embedding_correct_threshold": COSINE,
    "eval.embedding_cover_threshold": COSINE,
    "eval.embedding_number_rule": OneOf(("unmatched", "incorrect", "ignore")),
    "eval.embedding_threads": POSITIVE_INT,
    # ---- the demo (configs/demo.py) ----
    "demo.n_val": COUNT,
    "demo.gt_caption": OneOf(("annotated", "exact")),
    "demo.annotator.kind": OneOf(ANNOTATOR_KINDS),
    **{f"demo.annotator.omit.{kind}": PROBABILITY for kind in EVENT_KINDS},
    "demo.annotator.false_rate": PROBABILITY,
    "demo.annotator.annotators": POSITIVE_INT,
    "demo.annotator.spread": Number(low=0, high=1),
    # ---- mesh: -1 = all remaining devices ----
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.context": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
}

_MISSING = object()


def lookup(config, field: str, default=_MISSING):
    """`config.a.b` by its dotted name (`default` when a section or field is absent)."""
    node = config
    for name in field.split("."):
        try:
            node = node[name]
        except (KeyError, AttributeError, TypeError):
            return default
    return node


def problems(config, *, needs_tokenizer: bool = False) -> list[str]:
    """Every rule `config` breaks, one line each: field, bad value, allowed values, fix."""
    out = []
    for field, rule in RULES.items():
        value = lookup(config, field)
        if value is _MISSING:
            continue
        problem = rule.problem(value)
        if problem:
            out.append(f"{field}={value!r}: {problem}; fix: --config.{field}=<allowed value>")
    if needs_tokenizer and not (str(lookup(config, "data.tokenizer", "") or "")
                                or str(lookup(config, "model.pretrained.tokenizer", "") or "")):
        out.append("data.tokenizer is empty but this command reads text through the tokenizer; fix: "
                   "--config.data.tokenizer=DIR (a saved Hugging Face tokenizer) or set "
                   "model.pretrained.tokenizer")
    return out


def accumulation_problems(config) -> list[str]:
    """For `train`: the step count of the stage being trained (mrdpo: steps_per_round; rebirth: its
    num_steps, else train's; others: train.num_steps, unless train.epochs derives it, rounded up)
    when it is not a multiple of train.grad_accum: its last micro-batches would be accumulated and
    never applied (the optimizer updates every grad_accum steps)."""
    accum = lookup(config, "train.grad_accum", 1)
    if not isinstance(accum, int) or accum <= 1:
        return []
    stage = lookup(config, "stage", "")
    field = "train.num_steps"
    if stage == "mrdpo":
        field = "mrdpo.steps_per_round"
    elif stage == "rebirth" and lookup(config, "rebirth.num_steps", 0):
        field = "rebirth.num_steps"
    elif lookup(config, "train.epochs", 0):
        return []
    steps = lookup(config, field, 0)
    if not isinstance(steps, int) or steps <= 0 or not steps % accum:
        return []
    return [f"{field}={steps!r}: not a multiple of train.grad_accum={accum}; its last "
            f"{steps % accum} step(s) would never update the weights; fix: "
            f"--config.{field}={steps - steps % accum or accum}"]


def validate(config, *, needs_tokenizer: bool = False) -> None:
    """Raise ConfigError listing every broken rule (see `problems`); `needs_tokenizer` for commands
    whose data pipeline encodes text (training on JSONL records, captioning)."""
    found = problems(config, needs_tokenizer=needs_tokenizer)
    if found:
        raise ConfigError("invalid config:\n  " + "\n  ".join(found))


def check_for_cli(prog: str, config, *, needs_tokenizer: bool = False) -> int:
    """`validate` for a command: 0 when valid, else the problems on stderr and exit status 2."""
    try:
        validate(config, needs_tokenizer=needs_tokenizer)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    return 0
