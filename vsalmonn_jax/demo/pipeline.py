"""The demo's stages in order, each under run_dir/stages/<name>/ (eval.json, val.json, done; model.msgpack):
a rerun skips finished stages. After every stage the validation split (where every choice is read)
and the test split (scored once per stage, for the report) are captioned, scored, QA answered.

pretrain (tiny visual LLM: LLM full-parameter + vision connector on visual-only captions, plus
text-only exact captions) -> align (audio connector on audio-only captions)
-> sft (LoRA + connectors on the annotator's AV captions + QA) -> mrdpo_1..R | control_1..R (the rounds
of training/mrdpo.py's run_mrdpo on fresh clips, resumable mid-round; control: DPO term off) ->
rebirth (SFT the pre-DPO model on the final mrDPO model's captions of training clips + QA).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax
import numpy as np

from vsalmonn_jax.atomic_file import write_json, write_jsonl
from vsalmonn_jax.data.event_grammar import render_caption
from vsalmonn_jax.data.event_qa import event_qa_prompt
from vsalmonn_jax.data.text import load_tokenizer
from vsalmonn_jax.demo import model as model_lib
from vsalmonn_jax.demo.batches import ExampleIterator, Tokens
from vsalmonn_jax.demo.caption import Captioner, evaluate_model, judged
from vsalmonn_jax.demo.data import add_time_tokens, data_lock, prepare_data, tokenizer_corpus
from vsalmonn_jax.demo.env import DemoPolicyEnv, policy_model, policy_state
from vsalmonn_jax.demo.train import shown_metrics, train_stage
from vsalmonn_jax.lora import init_lora
from vsalmonn_jax.training.sharding import make_mesh


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
            user = event_qa_prompt(qa["question"], qa["options"])
            answer = qa["options"][qa["answer"]]
            out.append({"split": split, "row": r, "media": media,
                        "text": ctx.tokens.response_row(answer, user, has_media=media)})
    return out


def text_examples(ctx: Context, split: str) -> list[dict]:
    """Text-only rows (no media): the exact captions, so the tiny base LLM knows the whole caption
    grammar (sound sentences included). QA wording is left to SFT (with media): as text-only rows
    here it made 3 of 4 pretraining rows media-free and halved the steps that teach perception."""
    return [{"split": split, "row": r, "media": False,
             "text": ctx.tokens.response_row(item["exact"], has_media=False)}
            for r, item in enumerate(ctx.data[split]["items"])]


def _iterator(ctx, examples, modality, seed):
    demo = ctx.config.demo
    return ExampleIterator(examples, {k: v["media"] for k, v in ctx.data.items()},
                           batch_size=int(demo.batch_size), length=ctx.tokens.length,
                           pad_id=ctx.tokens.pad_id, modality=modality, seed=seed)


# ---------------------------------------------------------------------------------- stages ----
def pretrain(ctx: Context, base: dict) -> dict:
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    texts = [render_caption(ev) for ev in _modality_events(items, "visual")]
    examples = caption_examples(ctx, "train", texts) + text_examples(ctx, "train")
    it = _iterator(ctx, examples, "video", int(demo.seed) + 1)
    trainable = {"adapter": {"llm": base["params"]["llm"],
                             "vision_connector": base["adapter"]["vision_connector"]}}
    out, _ = train_stage(ctx.base_task, ctx.config, params={}, trainable=trainable,
                         batches=it, num_steps=int(demo.pretrain_steps), lr=float(demo.pretrain_lr),
                         seed=int(demo.seed) + 1, log=ctx.log, name="pretrain")
    adapter = dict(base["adapter"], vision_connector=out["adapter"]["vision_connector"])
    return {"params": {"llm": out["adapter"]["llm"]}, "adapter": adapter, "lora": None}


def align(ctx: Context, prev: dict) -> dict:
    """The audio connector on audio-only captions (the paper's stage 1). demo.align_llm (not in the
    paper): the LLM and the vision connector train too, on those and on the pretraining's
    video-only captions replayed half and half (without them it forgets what it saw): a frozen
    2-layer LLM does not learn to read a new modality through a connector alone, as the paper's
    7B LLM does."""
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    texts = [render_caption(ev) for ev in _modality_events(items, "audio")]
    examples = caption_examples(ctx, "train", texts)
    if not demo.get("align_llm", False):
        it = _iterator(ctx, examples, "audio", int(demo.seed) + 2)
        trainable = {"adapter": {"audio_connector": prev["adapter"]["audio_connector"]}}
        out, _ = train_stage(ctx.base_task, ctx.config, params=prev["params"],
                             trainable=trainable, batches=it,
                             num_steps=int(demo.align_steps), lr=float(demo.align_lr),
                             seed=int(demo.seed) + 2, log=ctx.log, name="align")
        return dict(prev, adapter=dict(prev["adapter"], **out["adapter"]))
    seen = [render_caption(ev) for ev in _modality_events(items, "visual")]
    examples = ([dict(e, modality="audio") for e in examples]
                + [dict(e, modality="video") for e in caption_examples(ctx, "train", seen)])
    it = _iterator(ctx, examples, "av", int(demo.seed) + 2)
    trainable = {"adapter": {**prev["adapter"], "llm": prev["params"]["llm"]}}   # + both connectors
    out, _ = train_stage(ctx.base_task, ctx.config, params={}, trainable=trainable, batches=it,
                         num_steps=int(demo.align_steps), lr=float(demo.align_lr),
                         seed=int(demo.seed) + 2, log=ctx.log, name="align")
    adapter = dict(out["adapter"])
    return {"params": {"llm": adapter.pop("llm")}, "adapter": adapter, "lora": None}


def sft(ctx: Context, prev: dict) -> dict:
    demo = ctx.config.demo
    items = ctx.data["train"]["items"]
    examples = caption_examples(ctx, "train", [it["annotated"] for it in items]) + qa_examples(ctx, "train")
    it = _iterator(ctx, examples, "av", int(demo.seed) + 3)
    lora = {"llm": init_lora(jax.random.PRNGKey(int(demo.seed) + 3), prev["params"]["llm"],
                             ctx.task.model.lora)}
    trainable = {"lora": lora, "adapter": prev["adapter"]}
    out, _ = train_stage(ctx.task, ctx.config, params=prev["params"],
                         trainable=trainable, batches=it, num_steps=int(demo.sft_steps),
                         lr=float(demo.sft_lr), seed=int(demo.seed) + 3, log=ctx.log, name="sft")
    return {"params": prev["params"], "adapter": out["adapter"], "lora": out["lora"]}


def _gt_caption(ctx: Context, item: dict) -> str:
    """The GT-caption guidance target: the SFT annotator's caption (as in the paper: the human
    caption) or, with demo.gt_caption=exact, the complete ground-truth caption."""
    return item["exact"] if ctx.config.demo.gt_caption == "exact" else item["annotated"]


def arm_config(config, control: bool):
    """The demo's settings on training/mrdpo.py's config: demo.dpo_steps steps at demo.dpo_lr per
    round on pairs of demo.batch_size, round r sampling fresh clips [r n_fresh, (r+1) n_fresh);
    one checkpoint at each round's end (plus the SIGTERM save)."""
    cfg = config.copy_and_resolve_references()
    demo = cfg.demo
    cfg.seed = int(demo.seed)
    cfg.data.shuffle_seed = int(demo.seed)
    cfg.mrdpo.update(dict(steps_per_round=int(demo.dpo_steps), videos_per_round=int(demo.n_fresh),
                          batch_size=int(demo.batch_size), sample_batch=int(demo.eval_batch),
                          max_new_tokens=int(demo.max_caption_tokens), control=bool(control)))
    cfg.train.update(dict(lr=float(demo.dpo_lr), checkpoint_every=int(demo.dpo_steps),
                          log_every=max(1, int(demo.dpo_steps) // 4)))
    return cfg


class Preempted(RuntimeError):
    """SIGTERM during an mrDPO round: its state is saved; `demo --resume RUN_DIR` continues it."""


def mrdpo_arm(ctx: Context, pre_dpo: dict, arm: str, on_step=None) -> dict:
    """Rounds 1..R of one arm through training/mrdpo.py's run_mrdpo (arm "control": the DPO term
    off), resumable mid-round from run_dir/rounds/<arm>. Each round is a stage (stages/<arm>_<r>/
    eval.json, captions.jsonl, done) scored like every stage. Returns {stage: eval record}."""
    from vsalmonn_jax.training.mrdpo import run_mrdpo

    cfg = arm_config(ctx.config, arm == "control")
    names = [f"{arm}_{r}" for r in range(1, int(cfg.mrdpo.rounds) + 1)]
    records = {n: _record(ctx, n) for n in names if (ctx.run_dir / "stages" / n / "done").exists()}
    for name in records:
        ctx.log(f"[{name}] finished earlier: skipped (delete {ctx.run_dir / 'stages' / name} and "
                f"{arm_workdir(ctx, arm)} to redo)")
    if len(records) == len(names):
        return records
    env = DemoPolicyEnv(ctx.task, ctx.tokens, ctx.data, sample_batch=int(cfg.mrdpo.sample_batch))
    mesh = make_mesh(dict(cfg.mesh))
    items = [dict(it, caption=_gt_caption(ctx, it)) for it in ctx.data["fresh"]["items"]]
    clock = {"start": time.perf_counter()}

    def eval_fn(state) -> dict:
        clock["eval"] = time.perf_counter()
        result = evaluate_stage(ctx, policy_model(state))
        clock["result"] = result
        micro = result["aggregate"]["micro"]
        return {**{k: micro[k] for k in ("miss", "incorrect", "hallucination", "total")},
                "qa_accuracy": result["qa"]["accuracy"]}

    def on_round(r: int, state, entry: dict) -> None:
        now, name = time.perf_counter(), names[r]
        stats = dict(entry["pairs"], history=[entry["first_step"], entry["last_step"]])
        if arm == "control":   # trained on the GT captions only: the pairs were not used
            stats.update(pairs=0, sampled_pairs=stats["pairs"])
        timing = {"train_s": clock["eval"] - clock["start"], "eval_s": now - clock["eval"]}
        clock["start"] = now
        write_record(ctx, name, dict(clock.pop("result")), stats, timing)

    def step_log(r: int, step: int, metrics: dict) -> None:
        n = int(cfg.mrdpo.steps_per_round)
        if step % int(cfg.train.log_every) == 0 or step in (1, n):
            ctx.log(f"[{names[r]}] step {step}/{n} {shown_metrics(metrics)}")
        if on_step is not None:
            on_step(r, step, metrics)

    ctx.log(f"[{arm}] rounds {len(records) + 1}..{len(names)} (run_mrdpo in {arm_workdir(ctx, arm)})")
    start = policy_state(env.task, cfg, pre_dpo, mesh, int(cfg.seed))
    _, summary = run_mrdpo(cfg, env, arm_workdir(ctx, arm), state=start, train_items=items,
                           eval_fn=eval_fn, mesh=mesh, on_step=step_log, on_round=on_round)
    if summary["preempted"]:
        raise Preempted(f"[{names[summary['round']]}] preempted (SIGTERM) at step "
                        f"{summary['step']}: its state is saved")
    return {n: _record(ctx, n) for n in names}


def arm_workdir(ctx: Context, arm: str) -> pathlib.Path:
    return ctx.run_dir / "rounds" / arm


def arm_model(ctx: Context, pre_dpo: dict, arm: str, round_index: int) -> dict:
    """The model entering round `round_index` of an arm (0: the pre-DPO model, its LoRA merged
    and a fresh LoRA drawn; R: the arm's final model), from the arm's round checkpoints."""
    from vsalmonn_jax.training.mrdpo import load_round_state

    cfg = arm_config(ctx.config, arm == "control")
    target = policy_state(ctx.task, cfg, pre_dpo, make_mesh(dict(cfg.mesh)), int(cfg.seed))
    state, _ = load_round_state(arm_workdir(ctx, arm), round_index, target)
    return policy_model(state)


def rebirth(ctx: Context, pre_dpo: dict) -> tuple[dict, dict]:
    """SFT from the pre-DPO model (its LoRA merged, a fresh LoRA) on the final mrDPO model's
    captions of training clips + QA."""
    cfg, demo = ctx.config, ctx.config.demo
    start = arm_model(ctx, pre_dpo, "mrdpo", 0)
    final = arm_model(ctx, pre_dpo, "mrdpo", int(cfg.mrdpo.rounds))
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
    it = _iterator(ctx, examples, "av", int(demo.seed) + 7)
    out, _ = train_stage(ctx.task, cfg, params=start["params"],
                         trainable={"lora": start["lora"], "adapter": start["adapter"]},
                         batches=it, num_steps=int(demo.rebirth_steps), lr=float(demo.rebirth_lr),
                         seed=int(demo.seed) + 7, log=ctx.log, name="rebirth")
    stats = {"captions": len(captions), "qa_examples": n_qa}
    return {"params": start["params"], "adapter": out["adapter"], "lora": out["lora"]}, stats


# ----------------------------------------------------------------------------- orchestration ----
def run_stage(ctx: Context, name: str, build, modality: str = "av") -> tuple[dict, dict]:
    """Load a finished stage, or build + evaluate + checkpoint it. Returns (model, eval record)."""
    folder = ctx.run_dir / "stages" / name
    if (folder / "done").exists():
        ctx.log(f"[{name}] finished earlier: skipped (delete {folder} to redo)")
        return model_lib.load_tree(folder / "model.msgpack"), _record(ctx, name)
    ctx.log(f"[{name}] start")
    start = time.perf_counter()
    built = build()
    model, stats = built if isinstance(built, tuple) else (built, {})
    model = {k: (jax.device_get(v) if v else None) for k, v in model.items()}
    model_lib.save_tree(folder / "model.msgpack", model)
    train_s = time.perf_counter() - start
    result = evaluate_stage(ctx, model, modality)
    timing = {"train_s": train_s, "eval_s": time.perf_counter() - start - train_s}
    return model, write_record(ctx, name, result, stats, timing, modality)


def evaluate_stage(ctx: Context, model: dict, modality: str = "av") -> dict:
    """The test split captioned (greedy) and scored, its QA answered (demo/caption.py); the same on
    the validation split (when demo.n_val > 0) under "val"."""
    demo = ctx.config.demo
    captioner = Captioner(ctx.task if model.get("lora") else ctx.base_task, ctx.tokens, model, modality)
    run = lambda split: evaluate_model(captioner, ctx.data[split], batch=int(demo.eval_batch),
                                       max_new_tokens=int(demo.max_caption_tokens))
    result = run("test")
    if "val" in ctx.data:
        result["val"] = run("val")
    return result


def write_record(ctx: Context, name: str, result: dict, stats: dict, timing: dict,
                 modality: str = "av") -> dict:
    """stages/<name>/{captions.jsonl, eval.json, done} from an evaluate_stage result; logs the
    scores. Returns the eval record."""
    folder = ctx.run_dir / "stages" / name
    folder.mkdir(parents=True, exist_ok=True)
    val = result.pop("val", None)
    if val is not None:   # written before done: a finished stage always has both
        write_json(folder / "val.json", {"stage": name, **val}, default=float)
    captions = result.pop("captions")
    record = {"stage": name, "modality": modality, "stats": stats, **timing,
              "load_avg": os.getloadavg()[1], "cpus": os.cpu_count(), **result}
    write_jsonl(folder / "captions.jsonl", captions)
    write_json(folder / "eval.json", record, default=float)
    (folder / "done").write_text("")
    pairs = f"{stats['pairs']} pairs, " if "pairs" in stats else ""
    if val is not None:
        ctx.log(f"[{name}] val: {_scores(val)}")
    ctx.log(f"[{name}] test: {_scores(record)} ({pairs}{record['train_s']:.0f}s train, "
            f"{record['eval_s']:.0f}s eval)")
    return record


def _scores(result: dict) -> str:
    micro = result["aggregate"]["micro"]
    return (f"Miss {100 * micro['miss']:.1f} Incorrect {100 * micro['incorrect']:.1f} "
            f"Hall {100 * micro['hallucination']:.1f} Total {100 * micro['total']:.1f} "
            f"QA {100 * result['qa']['accuracy']:.1f}")


def _record(ctx: Context, name: str) -> dict:
    return json.loads((ctx.run_dir / "stages" / name / "eval.json").read_text(encoding="utf-8"))


def setup(config, run_dir: pathlib.Path, data_dir: pathlib.Path, log) -> tuple[Context, dict]:
    demo = config.demo
    t0 = time.perf_counter()
    init_path = run_dir / "stages" / "init" / "model.msgpack"
    # the tokenizer is needed for the placeholder id; the data set writes it first
    from vsalmonn_jax.data import synthetic

    with data_lock(data_dir):
        if not (data_dir / "tokenizer").exists():
            synthetic.build_tokenizer(
                tokenizer_corpus(config),
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
    with data_lock(data_dir):
        data = prepare_data(data_dir, config, task.model, variables["params"], log)
    for split in data.values():
        split["media"] = add_time_tokens(split["media"], tokenizer, config.data.time_tokens)
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
    arms = ["mrdpo"] + (["control"] if config.demo.control else [])
    for arm in arms:
        records.update(mrdpo_arm(ctx, pre_dpo, arm))
    _, records["rebirth"] = run_stage(ctx, "rebirth", lambda: rebirth(ctx, pre_dpo))
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
            records[name] = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        else:
            missing.append(name)
    return records, missing
