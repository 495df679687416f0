"""The checkpoint's generation_config.json: what the release's Hugging Face `generate` merged into
its calls. vsalmonn-jax decodes with its own config and flags only, so fields that would change
the output are reported (a warning naming the file), never applied silently or ignored silently.
"""

from __future__ import annotations

import json
import pathlib
import sys

from vsalmonn_jax.generate.sampling import SamplingConfig

# fields HF applies that vsalmonn-jax does not implement, with their neutral values (greedy or not;
# the cutoffs only when sampling, but a checkpoint that sets them is worth a word either way)
UNAPPLIED = {"encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,), "num_beams": (1,),
             "min_length": (0,), "min_new_tokens": (None, 0), "suppress_tokens": (None, []),
             "begin_suppress_tokens": (None, []), "bad_words_ids": (None, []),
             "typical_p": (None, 1.0), "min_p": (None, 0.0), "epsilon_cutoff": (None, 0.0),
             "eta_cutoff": (None, 0.0)}
# compared when sampling: the file's value, else the default HF's GenerationConfig fills in (the
# release's sampled calls pass do_sample and top_p=0.9 themselves, so the file's top_p never applied)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50}


def checkpoint_generation_config(config) -> tuple[pathlib.Path | None, dict]:
    """(path, fields) of generation_config.json in model.pretrained.official's folder, else
    .llava's; (None, {}) when neither has one."""
    section = config.model.get("pretrained") or {}
    for key in ("official", "llava"):
        folder = section.get(key)
        path = pathlib.Path(folder) / "generation_config.json" if folder else None
        if path is not None and path.is_file():
            try:
                return path, dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as err:
                raise ValueError(f"{path}: unreadable generation config ({err})") from err
    return None, {}


def unapplied(fields: dict, sampling: SamplingConfig) -> dict:
    """The fields of a generation config that would make HF decode otherwise than `sampling`: the
    ones vsalmonn-jax does not implement, a repetition penalty other than ours, and (when
    sampling) a temperature / top_k other than ours, the file's or else HF's default (top_k 50)."""
    out = {k: fields[k] for k, neutral in UNAPPLIED.items() if k in fields and fields[k] not in neutral}
    penalty = fields.get("repetition_penalty")
    if penalty is not None and float(penalty) != float(sampling.repetition_penalty):   # greedy too
        out["repetition_penalty"] = penalty
    if not sampling.greedy:
        for name, default in SAMPLING_DEFAULTS.items():
            value = default if fields.get(name) is None else fields[name]
            if float(value) != float(getattr(sampling, name)):
                out[name] = value
    return out


def warn_unapplied(config, sampling: SamplingConfig, command: str) -> dict:
    """Print (stderr) which fields of the checkpoint's generation_config.json this run does not
    apply; returns them ({} when none, or no file)."""
    path, fields = checkpoint_generation_config(config)
    if path is None:   # no file: nothing known of what the checkpoint's calls applied
        return {}
    diff = unapplied(fields, sampling)
    if diff:
        print(f"{command}: WARNING {path} sets {', '.join(f'{k}={v}' for k, v in diff.items())}: the "
              "release's Hugging Face generate applied them, vsalmonn-jax decodes with its own "
              f"settings ({sampling}); outputs can differ from the release's (set them with "
              "generate.* / the sampling flags, e.g. generate.repetition_penalty)", file=sys.stderr)
    return diff
