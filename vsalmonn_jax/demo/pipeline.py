"""The demo's stages in order, each checkpointed under run_dir/stages/<name>/ (model.msgpack,
eval.json, done): a rerun skips finished stages. After every stage the test split is captioned
and scored (exact judge) and its QA answered.

pretrain (tiny visual LLM: LLM full-parameter + vision connector on visual-only captions of the
video, plus text-only rows: exact captions and QA wording) -> align (audio connector on audio-only captions) -> sft (LoRA + connectors on the biased AV
captions + QA) -> mrdpo_1..R (sample k per fresh clip, best-vs-worst pairs, DPO + GT-CE, merge
LoRA, fresh LoRA) | control_1..R (same rounds, DPO term off) -> rebirth (SFT the pre-DPO model on
the mrDPO model's captions of the training clips + QA).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax
import numpy as np

from vsalmonn_jax.data.event_grammar import render_caption
from vsalmonn_jax.data.text import load_tokenizer, mcq_answer, mcq_prompt
from vsalmonn_jax.demo import model as model_lib
from vsalmonn_jax.demo.batches import ExampleIterator, Tokens
from vsalmonn_jax.demo.caption import Captioner, evaluate_model, judged
from vsalmonn_jax.demo.data import prepare_data
from vsalmonn_jax.demo.train import train_stage
from vsalmonn_jax.eval import get_judge
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.lora import init_lora, merge
from vsalmonn_jax.training.pairs import PairRule, Sample, build_pairs, pair_stats, score_samples


@dataclasses.dataclass
class Context:
    config: object
    run_dir: pathlib.Path
    data: dict
    tokens: Tokens
    task: model_lib.CachedAVTask          # with LoRA
    base_task: model_lib.CachedAVTask     # without LoRA (pretraining)
    log: object
    timings: dict


def _modality_events(items, modality: str | None):
    return [[e for e in it["events"] if modality is None or e["modality"] == modality] for it in items]


def caption_examples(ctx: Context, split: str, texts: list[str], rows=None) -> list[dict]:
    rows = range(len(texts)) if rows is None else rows
    return [{"split": split, "row": int(r), "text": ctx.tokens.response_row(t)}
            for r, t in zip(rows, texts, strict=True) if t]


def qa_examples(ctx: Context, split: str, media: bool = True) -> list[dict]:
    out = []
    for r, item in enumerate(ctx.data[split]["items"]):
        for qa in item["qa"]:
            user = mcq_prompt(qa["question"], qa["options"])
            answer = mcq_answer(qa["options"], qa["answer"])
            out.append({"split": split, "row": r, "media": media,
                        "text": ctx.tokens.response_row(answer, user, has_media=media)})
    return out


def text_examples(ctx: Context, split: str) -> list[dict]:
    """Text-only rows (no media): the exact captions and the QA wording, so the tiny base LLM knows
    the whole caption grammar (sound sentences included) and the answer format."""
    tokens = ctx.tokens
    out = [{"split": split, "row": r, "media": False,
            "text": tokens.response_row(item["exact"], has_media=False)}
           for r, item in enumerate(ctx.data[split]["items"])]
    return out + qa_examples(ctx, split, media=False)


def _iterator(ctx, examples, modality, seed, prefixes=("",)):
    demo = ctx.config.demo
    return ExampleIterator(examples, {k: v["media"] for k, v in ctx.data.items()},
                           batch_size=int(demo.batch_size), length=ctx.tokens.length,
                           pad_id=ctx.tokens.pad_id, modality=modality, seed=seed, prefixes=prefixes)


def _fresh_lora(ctx, params, salt: int):
    return {"llm": init_lora(jax.random.PRNGKey(int(ctx.config.demo.seed) + salt), params["llm"],
                             ctx.task.model.lora)}


# ---------------------------------------------------------------------------------- stages ----
def pretrain(ctx: Context, base: dict) -> dict:
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    texts = [render_caption(ev) for ev in _modality_events(items, "visual")]
    examples = caption_examples(ctx, "train", texts) + text_examples(ctx, "train")
    it = _iterator(ctx, examples, "video", int(demo.seed) + 1)
    trainable = {"adapter": {"llm": base["params"]["llm"],
                             "vision_connector": base["adapter"]["vision_connector"]}}
    out, _ = train_stage(ctx.base_task, ctx.config, objective="sft", params={}, trainable=trainable,
                         batches=it, num_steps=int(demo.pretrain_steps), lr=float(demo.pretrain_lr),
                         seed=int(demo.seed) + 1, log=ctx.log, name="pretrain")
    adapter = dict(base["adapter"], vision_connector=out["adapter"]["vision_connector"])
    return {"params": {"llm": out["adapter"]["llm"]}, "adapter": adapter, "lora": None}


def align(ctx: Context, prev: dict) -> dict:
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    texts = [render_caption(ev) for ev in _modality_events(items, "audio")]
    it = _iterator(ctx, caption_examples(ctx, "train", texts), "audio", int(demo.seed) + 2)
    trainable = {"adapter": {"audio_connector": prev["adapter"]["audio_connector"]}}
    out, _ = train_stage(ctx.base_task, ctx.config, objective="sft", params=prev["params"],
                         trainable=trainable, batches=it, num_steps=int(demo.align_steps),
                         lr=float(demo.align_lr), seed=int(demo.seed) + 2, log=ctx.log, name="align")
    return dict(prev, adapter=dict(prev["adapter"], **out["adapter"]))


def sft(ctx: Context, prev: dict) -> dict:
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    examples = caption_examples(ctx, "train", [it["biased"] for it in items]) + qa_examples(ctx, "train")
    it = _iterator(ctx, examples, "av", int(demo.seed) + 3)
    trainable = {"lora": _fresh_lora(ctx, prev["params"], 3), "adapter": prev["adapter"]}
    out, _ = train_stage(ctx.task, ctx.config, objective="sft", params=prev["params"],
                         trainable=trainable, batches=it, num_steps=int(demo.sft_steps),
                         lr=float(demo.sft_lr), seed=int(demo.seed) + 3, log=ctx.log, name="sft")
    return {"params": prev["params"], "adapter": out["adapter"], "lora": out["lora"]}


def merged_base(ctx: Context, model: dict) -> dict:
    """The round boundary: LoRA merged into the base weights (a model without LoRA is unchanged)."""
    if not model.get("lora"):
        return model["params"]
    return {"llm": jax.device_get(merge(model["params"]["llm"], model["lora"]["llm"],
                                        ctx.task.model.lora.scale))}


def sample_pairs(ctx: Context, policy: dict, rows: np.ndarray, round_index: int) -> tuple[list, dict]:
    """k samples per fresh clip from the policy, judged and paired with training/pairs.py's rule
    (mrdpo.pair_rule / pair_mode / drop_ties) -> (DPO examples, pair statistics)."""
    cfg, demo = ctx.config, ctx.config.demo
    k = int(cfg.mrdpo.samples_per_video)
    split = ctx.data["fresh"]
    sampling = SamplingConfig(greedy=False, temperature=float(cfg.generate.temperature),
                              top_p=float(cfg.generate.top_p))
    captioner = Captioner(ctx.task, ctx.tokens, policy)
    flat = captioner.captions(split, batch=int(demo.eval_batch), rows=rows, repeats=k,
                              max_new_tokens=int(demo.max_caption_tokens), sampling=sampling,
                              rng=jax.random.PRNGKey(int(demo.seed) * 100 + round_index))
    samples = [[Sample(text=t, stopped=s) for t, s in flat[c * k:(c + 1) * k]] for c in range(len(rows))]
    items = [dict(split["items"][r], row=int(r), caption=_gt_caption(ctx, split["items"][r]))
             for r in rows]
    scores = score_samples(get_judge(cfg.mrdpo.judge, cfg), items, samples)
    records = build_pairs(items, samples, scores, PairRule.from_config(cfg),
                          default_prompt=cfg.generate.prompt)
    row_of = {it["id"]: it["row"] for it in items}
    examples = [{"split": "fresh", "row": row_of[r["video_id"]],
                 "chosen": ctx.tokens.response_row(r["chosen"]),
                 "rejected": ctx.tokens.response_row(r["rejected"]),
                 "gt": ctx.tokens.response_row(r["gt"])} for r in records if "chosen" in r]
    return examples, pair_stats(items, samples, scores, records)


def _gt_caption(ctx: Context, item: dict) -> str:
    """The GT-caption guidance target: the SFT annotator's caption (as in the paper: the human
    caption) or, with demo.gt_caption=exact, the complete ground-truth caption."""
    return item["exact"] if ctx.config.demo.gt_caption == "exact" else item["biased"]


def mrdpo_round(ctx: Context, prev: dict, round_index: int, dpo: bool) -> tuple[dict, dict]:
    """One round: merge + fresh LoRA (reference = round-start policy), pairs, N steps."""
    cfg, demo = ctx.config, ctx.config.demo
    params = merged_base(ctx, prev)
    policy = {"params": params, "adapter": prev["adapter"],
              "lora": _fresh_lora(ctx, params, 100 + round_index)}
    n = int(demo.n_fresh)
    rows = np.arange((round_index - 1) * n, round_index * n)
    name = f"{'mrdpo' if dpo else 'control'}_{round_index}"
    seed = int(demo.seed) + 10 * round_index + (0 if dpo else 5)
    if dpo:
        examples, stats = sample_pairs(ctx, policy, rows, round_index)
        ctx.log(f"[{name}] {stats['pairs']} pairs from {stats['videos']} clips x "
                f"{cfg.mrdpo.samples_per_video} samples (sample Total "
                f"{100 * stats['sample_total']:.1f}%)")
        it = _iterator(ctx, examples, "av", seed, prefixes=("chosen_", "rejected_", "gt_"))
        objective, ref = "dpo", policy["adapter"]
    else:   # control arm: the same clips' ground-truth captions with CE only (DPO term off)
        items = ctx.data["fresh"]["items"]
        texts = [_gt_caption(ctx, items[r]) for r in rows]
        examples = caption_examples(ctx, "fresh", texts, rows)
        stats = {"videos": int(len(rows)), "pairs": 0}
        it = _iterator(ctx, examples, "av", seed)
        objective, ref = "sft", None
    out, history = train_stage(ctx.task, cfg, objective=objective, params=params,
                               trainable={"lora": policy["lora"], "adapter": policy["adapter"]},
                               batches=it, num_steps=int(demo.dpo_steps), lr=float(demo.dpo_lr),
                               seed=seed, ref_adapter=ref, log=ctx.log, name=name,
                               log_every=max(1, int(demo.dpo_steps) // 4))
    stats["history"] = history
    return {"params": params, "adapter": out["adapter"], "lora": out["lora"]}, stats


def rebirth(ctx: Context, pre_dpo: dict, final: dict) -> tuple[dict, dict]:
    cfg, demo = ctx.config, ctx.config.demo
    rows = np.arange(min(int(demo.n_rebirth), len(ctx.data["train"]["items"])))
    captioner = Captioner(ctx.task, ctx.tokens, final)
    captions = captioner.captions(ctx.data["train"], batch=int(demo.eval_batch), rows=rows,
                                  max_new_tokens=int(demo.max_caption_tokens))
    examples = caption_examples(ctx, "train", [judged(t, s) for t, s in captions], rows)
    ratio = float(cfg.rebirth.non_caption_ratio)
    qa = qa_examples(ctx, "train")
    n_qa = min(len(qa), int(round(len(examples) * ratio / max(1e-9, 1 - ratio))))
    pick = np.random.default_rng(int(demo.seed) + 7).permutation(len(qa))[:n_qa]
    examples += [qa[i] for i in pick]
    params = merged_base(ctx, pre_dpo)
    it = _iterator(ctx, examples, "av", int(demo.seed) + 7)
    out, _ = train_stage(ctx.task, cfg, objective="sft", params=params,
                         trainable={"lora": _fresh_lora(ctx, params, 7), "adapter": pre_dpo["adapter"]},
                         batches=it, num_steps=int(demo.rebirth_steps), lr=float(demo.rebirth_lr),
                         seed=int(demo.seed) + 7, log=ctx.log, name="rebirth")
    stats = {"captions": len(captions), "qa_examples": n_qa}
    return {"params": params, "adapter": out["adapter"], "lora": out["lora"]}, stats


# ----------------------------------------------------------------------------- orchestration ----
def run_stage(ctx: Context, name: str, build, modality: str = "av") -> tuple[dict, dict]:
    """Load a finished stage, or build + evaluate + checkpoint it. Returns (model, eval record)."""
    folder = ctx.run_dir / "stages" / name
    if (folder / "done").exists():
        ctx.log(f"[{name}] finished earlier: skipped (delete {folder} to redo)")
        record = json.loads((folder / "eval.json").read_text())
        return model_lib.load_tree(folder / "model.msgpack"), record
    ctx.log(f"[{name}] start")
    start = time.perf_counter()
    built = build()
    model, stats = built if isinstance(built, tuple) else (built, {})
    model = {k: (jax.device_get(v) if v else None) for k, v in model.items()}
    model_lib.save_tree(folder / "model.msgpack", model)
    train_s = time.perf_counter() - start
    demo = ctx.config.demo
    captioner = Captioner(ctx.task if model.get("lora") else ctx.base_task, ctx.tokens, model, modality)
    result = evaluate_model(captioner, ctx.data["test"], batch=int(demo.eval_batch),
                            max_new_tokens=int(demo.max_caption_tokens))
    captions = result.pop("captions")
    record = {"stage": name, "modality": modality, "stats": stats, "train_s": train_s,
              "eval_s": time.perf_counter() - start - train_s, "load_avg": os.getloadavg()[1],
              "cpus": os.cpu_count(), **result}
    (folder / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (folder / "eval.json").write_text(json.dumps(record, default=float))
    (folder / "done").write_text("")
    micro = record["aggregate"]["micro"]
    ctx.log(f"[{name}] test: Miss {100 * micro['miss']:.1f} Incorrect {100 * micro['incorrect']:.1f} "
            f"Hall {100 * micro['hallucination']:.1f} Total {100 * micro['total']:.1f} "
            f"QA {100 * record['qa']['accuracy']:.1f} ({record['train_s']:.0f}s train, "
            f"{record['eval_s']:.0f}s eval)")
    return model, record


def setup(config, run_dir: pathlib.Path, data_dir: pathlib.Path, log) -> tuple[Context, dict]:
    demo = config.demo
    t0 = time.perf_counter()
    init_path = run_dir / "stages" / "init" / "model.msgpack"
    # the tokenizer is needed for the placeholder id; the data set writes it first
    from vsalmonn_jax.data import synthetic

    if not (data_dir / "tokenizer").exists():
        synthetic.build_tokenizer(synthetic.tokenizer_corpus(synthetic.synthetic_config(config),
                                                             config.model.connector.placeholder_token),
                                  str(data_dir / "tokenizer"), int(config.model.llm.vocab_size),
                                  config.model.connector.placeholder_token)
    tokenizer = load_tokenizer(str(data_dir / "tokenizer"))
    tokens = Tokens(tokenizer, config.model.connector.placeholder_token, config.generate.prompt,
                    int(demo.max_prompt_tokens), int(demo.max_caption_tokens),
                    int(demo.max_text_tokens))
    av_cfg, lcfg = model_lib.configs(config, tokens.placeholder_id)
    if init_path.exists():
        variables = model_lib.load_tree(init_path)
    else:
        variables = model_lib.random_init(av_cfg, jax.random.PRNGKey(int(demo.seed)))
        model_lib.save_tree(init_path, variables)
    task = model_lib.CachedAVTask(av_cfg, lcfg)
    base_task = model_lib.CachedAVTask(av_cfg, None)
    data = prepare_data(data_dir, config, task.model, variables["params"], log)
    timings = {"setup_s": time.perf_counter() - t0}
    log(f"[data] ready in {timings['setup_s']:.0f}s: " +
        ", ".join(f"{k} {len(v['items'])} clips" for k, v in data.items()))
    ctx = Context(config, run_dir, data, tokens, task, base_task, log, timings)
    base = {"params": {"llm": variables["params"]["llm"]}, "adapter": variables["adapter"], "lora": None}
    return ctx, base


def run_demo(config, run_dir: pathlib.Path, data_dir: pathlib.Path, log=print) -> dict:
    """All stages (finished ones are loaded); returns {stage: eval record} in stage order."""
    ctx, base = setup(config, run_dir, data_dir, log)
    records = {}
    model, records["pretrain"] = run_stage(ctx, "pretrain", lambda: pretrain(ctx, base), "video")
    model, records["align"] = run_stage(ctx, "align", lambda: align(ctx, model))
    pre_dpo, records["sft"] = run_stage(ctx, "sft", lambda: sft(ctx, model))
    rounds = int(config.mrdpo.rounds)
    arms = [("mrdpo", True)] + ([("control", False)] if config.demo.control else [])
    finals = {}
    for arm, dpo in arms:
        policy = pre_dpo
        for r in range(1, rounds + 1):
            policy, records[f"{arm}_{r}"] = run_stage(
                ctx, f"{arm}_{r}", lambda p=policy, r=r, d=dpo: mrdpo_round(ctx, p, r, d))
        finals[arm] = policy
    _, records["rebirth"] = run_stage(ctx, "rebirth", lambda: rebirth(ctx, pre_dpo, finals["mrdpo"]))
    return records


def stage_names(config) -> list[str]:
    """Every stage of a run, in order."""
    rounds = int(config.mrdpo.rounds)
    names = ["pretrain", "align", "sft"] + [f"mrdpo_{r}" for r in range(1, rounds + 1)]
    if config.demo.control:
        names += [f"control_{r}" for r in range(1, rounds + 1)]
    return names + ["rebirth"]


def finished_records(config, run_dir: pathlib.Path) -> tuple[dict, list[str]]:
    """({stage: eval record} of the finished stages, names of the unfinished ones)."""
    records, missing = {}, []
    for name in stage_names(config):
        folder = run_dir / "stages" / name
        if (folder / "done").exists():
            records[name] = json.loads((folder / "eval.json").read_text())
        else:
            missing.append(name)
    return records, missing
