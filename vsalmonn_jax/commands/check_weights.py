"""`vsalmonn-jax check-weights --config configs/X.py [--config.model.pretrained.*=...]`: which tensors
of config.model.pretrained's checkpoints the model finds, misses, cannot use or finds mis-shaped.

Headers only (safetensors headers; torch `.bin` memory-mapped with weights_only=True): no tensor data
is read, so it takes seconds at 7B. Per part (LLM, vision, projector, image_newline, Whisper,
Q-Former, audio projections, LoRA) it prints found / missing / mis-shaped / unexpected counts and
where the part comes from. Exit 1 when the frozen base is incomplete, a source lacks tensors of a
part it carries, an official tensor of a loaded part would be dropped (unread, or outside the config's
LoRA), a trainable part is loaded only partly, or a shape disagrees with the config; trainable parts
no source carries start fresh (as training initialises them) and are reported as such.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from vsalmonn_jax.models.pretrained import PARTS, part_of


def part_of_name(kind: str, name: str) -> str:
    """The part a checkpoint tensor name belongs to (for missing / unexpected names)."""
    if "lora_" in name or name.endswith((".A", ".B")):
        return "LoRA"
    checks = (("Q-Former", ("Qformer",)),
              ("audio projections", ("speech_query_tokens", "speech_llama_proj", "final_linear")),
              ("Whisper", ("speech_encoder", "ln_speech")), ("image_newline", ("image_newline",)),
              ("projector", ("mm_projector", "multi_modal_projector")),
              ("vision", ("vision_tower", "vision_model")))
    for part, needles in checks:
        if any(n in name for n in needles):
            return part
    return "Whisper" if kind == "whisper" else "LLM"


def dropped(kind: str, unused: list[str], tied: bool = False, store=None) -> list[str]:
    """Problems for an official source's unread tensors that belong to a model part (their weights
    would be lost), one line per part. `tied`: an unread lm_head equals the embedding (the plan
    checked it). With `store`, an unread LoRA module whose B is all zeros adds nothing (the
    release's never-trained SigLIP LoRA) and is not a problem."""
    import numpy as np

    from vsalmonn_jax.models.import_release import dropped_part

    if kind != "official":
        return []
    names = set(unused)

    def adds_nothing(name: str) -> bool:
        b = name.replace(".lora_A.", ".lora_B.")
        return store is not None and b in names and not np.any(np.asarray(store[b], np.float32))

    by_part = defaultdict(list)
    for name in unused:
        if (part := dropped_part(name)) is not None and not (tied and name.endswith("lm_head.weight")) \
                and not (part == "LoRA" and adds_nothing(name)):
            by_part[part].append(name)
    return [f"unused official: {len(names)} tensor(s) of the {part} no plan reads, e.g. "
            f"{', '.join(names[:3])}: they would be dropped (a layer count, LoRA target or name the "
            "config does not expect?)" for part, names in sorted(by_part.items())]


def model_shapes(config) -> dict:
    """{(collection, ...path): shape} of the AV model's variables (eval_shape: nothing allocated)."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from vsalmonn_jax.lora import LoraConfig
    from vsalmonn_jax.models.av_llm import init_variables
    from vsalmonn_jax.models.pretrained import av_config

    cfg = av_config(config)
    lora = LoraConfig.from_config(config.model.lora) if "lora" in config.train.trainable else None
    abstract = nn.unbox(jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), cfg, lora)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}


def check(config, out=sys.stdout) -> bool:
    """Print the report; True when everything the config needs is there and well shaped."""
    from vsalmonn_jax.models.pretrained import checksum, given, plan_pretrained

    if not given(config):
        print("check-weights: no weights configured: set --config.model.pretrained.llava=DIR, "
              ".whisper=DIR and/or .official=PATH", file=out)
        return False
    shapes = model_shapes(config)
    flat, sources = plan_pretrained(config, collect_missing=True)
    stats = defaultdict(lambda: defaultdict(int))
    origin: dict[str, set] = defaultdict(set)
    problems: list[str] = []
    for kind, info in sources.items():
        store = info["store"]
        print(f"source {kind}: {info['path']}\n  layout: {info['layout']}; {len(store.keys())} tensors; "
              f"header sha256 {checksum(store)[:16]}", file=out)
        used = set()
        for path, lazy in info["plan"].items():
            used.update(lazy.stored_names())
            part = part_of(path)
            origin[part].add(kind)
            want = shapes.get(path)
            if want is None:
                stats[part]["unexpected"] += len(lazy.names)
                if path[0] == "lora" and any(p[0] == "lora" for p in shapes):
                    problems.append(f"unused {kind}: {lazy.stored_names()[0]} (LoRA of "
                                    f"{'/'.join(path[1:-1])}) is not in model.lora.targets: dropped")
                continue
            if tuple(lazy.shape) != want:
                stats[part]["mis-shaped"] += len(lazy.names)
                problems.append(f"mis-shaped {kind}: {lazy.stored_names()[0]} gives {lazy.shape} for "
                                f"{'/'.join(path)}, the config needs {want}")
            else:
                stats[part]["found"] += len(lazy.names)
        for name in info["missing"]:
            part = part_of_name(kind, name)
            stats[part]["missing"] += 1
            problems.append(f"missing {kind}: {name} ({part})")
        unexpected = sorted(set(store.keys()) - used)
        problems += dropped(kind, unexpected, bool(config.model.llm.tie_word_embeddings), store)
        by_part = defaultdict(list)
        for name in unexpected:
            by_part[part_of_name(kind, name)].append(name)
        for part, names in by_part.items():
            stats[part]["unexpected"] += len(names)
            print(f"  not used ({part}): {len(names)}, e.g. {', '.join(names[:3])}", file=out)
    uncovered = defaultdict(list)
    for path in shapes:
        if path not in flat:
            uncovered[part_of(path)].append(path)
    print(f"\n{'part':<18} {'status':<8} {'found':>6} {'missing':>8} {'mis-shaped':>11} "
          f"{'unexpected':>11}  from", file=out)
    for part in PARTS:
        s = stats[part]
        needed = [p for p in uncovered[part] if p[0] == "params" and "ln_speech" not in p]
        if needed:
            s["missing"] += len(needed)
            problems.append(f"missing: {part} ({len(needed)} arrays, e.g. {'/'.join(needed[0])}): no "
                            "configured source holds it")
        partly = [p for p in uncovered[part] if p[0] != "params"] if s["found"] else []
        if partly:
            s["missing"] += len(partly)
            problems.append(f"partly loaded: {part} ({len(partly)} arrays, e.g. {'/'.join(partly[0])}, "
                            "would start fresh beside loaded ones)")
        status = "MISSING" if s["missing"] else "BAD" if s["mis-shaped"] else \
            "ok" if s["found"] else "fresh" if uncovered[part] else "-"
        print(f"{part:<18} {status:<8} {s['found']:>6} {s['missing']:>8} {s['mis-shaped']:>11} "
              f"{s['unexpected']:>11}  {', '.join(sorted(origin[part])) or 'initialised (config.seed)'}",
              file=out)
    for line in problems:
        print(line, file=out)
    print("check-weights: " + ("complete" if not problems else f"{len(problems)} problem(s)"), file=out)
    return not problems


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="vsalmonn-jax check-weights", description=__doc__.splitlines()[0],
                                   epilog="--config configs/7b_sft.py --config.model.pretrained.llava=DIR "
                                   "--config.model.pretrained.whisper=DIR")


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import load_config, split_config_args
    from vsalmonn_jax.safetensors_io import CheckpointError

    config_path, overrides, rest = split_config_args(argv)
    _parser().parse_args(rest)
    if not config_path:
        print("vsalmonn-jax check-weights: --config configs/X.py is required (the model's shapes)",
              file=sys.stderr)
        return 2
    config = load_config(config_path, overrides)
    try:
        return 0 if check(config) else 1
    except (CheckpointError, KeyError, OSError) as err:
        print(f"vsalmonn-jax check-weights: {err}", file=sys.stderr)
        return 1
