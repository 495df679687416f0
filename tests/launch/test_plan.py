"""`vsalmonn-jax plan`: token budget, divisibility traps, a tiny plan in-process, and the 7B plan on
a 64-device fake mesh (subprocess) that compiles without allocating weights and fits a v5p."""

import json
import pathlib
import re
import resource
import subprocess
import sys

import compile_only
import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from machine import scaled

from vsalmonn_jax import plan as plan_lib
from vsalmonn_jax.commands.plan import parse_mesh
from vsalmonn_jax.config import load_config
from vsalmonn_jax.training.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def test_video_tokens_match_the_paper():
    config = load_config("7b")
    t = plan_lib.video_tokens(config, 60, 512)
    assert (t.frames, t.visual, t.audio, t.text, t.total) == (60, 10920, 120, 512, 11552)
    long = plan_lib.video_tokens(config, 300, 0)  # capped at 110 frames: ~20k visual tokens
    assert (long.frames, long.visual) == (110, 20020)
    config.model.connector.interleave = "official"  # whole 30-s chunks, padding included
    assert plan_lib.video_tokens(config, 45, 0).audio == 120
    config.model.connector.pool_mode = "bilinear"  # ceil(27/2) = 14 -> 14 x 15
    assert plan_lib.video_tokens(config, 1, 0).visual == 210


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=16,tensor=2") == {"data": 2, "fsdp": 16, "context": 1, "tensor": 2}
    assert parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}
    assert parse_mesh("fsdp=4,context=4") == {"data": 1, "fsdp": 4, "context": 4, "tensor": 1}
    with pytest.raises(ValueError, match="expected data=N, fsdp=N, context=N or tensor=N"):
        parse_mesh("model=4")
    with pytest.raises(ValueError, match="'x' is not an integer"):
        parse_mesh("data=x")


def test_mesh_issues_flag_batch_and_heads():
    config = load_config("7b")
    issues = plan_lib.mesh_issues(config, {"data": 2, "fsdp": 16, "tensor": 8}, global_batch=24)
    assert issues[0] == ("global batch 24 is not divisible by data x fsdp = 32 (use a multiple of "
                         "32, e.g. 32)")
    assert any("num_heads = 28 is not divisible by tensor = 8" in i for i in issues)
    assert any("num_kv_heads = 4 is not divisible by tensor = 8" in i for i in issues)
    assert plan_lib.mesh_issues(config, {"data": 1, "fsdp": 16, "tensor": 4}, 16) == []


def test_indivisible_weights_are_replicated_and_noted():
    """A dimension the mesh does not divide is replicated (as training does: state_shardings), noted
    with its cost in the plan instead of stopping it; nothing else is flagged."""
    config = load_config("tiny", ["model.llm.vocab_size=511"])
    plan = plan_lib.make_plan(config, {"data": 2, "fsdp": 2, "tensor": 2}, video_seconds=2,
                              text_tokens=16, remat_policies=("full",), objectives=(),
                              budget_gb=16)
    assert plan.issues == [] and plan.model == "av"
    assert ("params/llm/embed_tokens/embedding dim 0 (511) is not divisible by tensor = 2: "
            "replicated on every device") in plan.notes
    assert any(n.startswith("params/llm/lm_head/kernel dim 1 (511)") for n in plan.notes)
    divisible = plan_lib.make_plan(load_config("tiny", ["model.llm.vocab_size=512"]),
                                   {"data": 2, "fsdp": 2, "tensor": 2}, video_seconds=2,
                                   text_tokens=16, remat_policies=("full",), objectives=(),
                                   budget_gb=16)
    assert not any("replicated" in n for n in divisible.notes)
    # the replicated tables are held whole on every device: more than the split 512-row ones
    assert plan.state_gb["params"] > divisible.state_gb["params"]
    assert "NOTE: params/llm/embed_tokens/embedding" in plan_lib.format_plan(plan)


def test_av_abstract_batch_holds_frames_and_mel():
    config = load_config("tiny")
    task = plan_lib.make_task(config, "av")
    data = NamedSharding(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), P(("data", "fsdp")))
    tokens = plan_lib.video_tokens(config, 45, 32)
    batch = plan_lib.abstract_batch(task, "dpo", 4, tokens, data)
    assert batch["pixel_values"].shape == (4, 45, 56, 56, 3)
    assert batch["mel"].shape == (4, 2, 16, 3000)  # two 30-s chunks
    assert batch["frame_mask"].shape == (4, 45) and batch["has_audio"].shape == (4,)
    for prefix in ("chosen_", "rejected_", "gt_"):  # the media are shared, the texts are not
        assert batch[prefix + "input_ids"].shape == (4, 33)  # text + the placeholder
    assert batch["mel"].sharding.spec == P(("data", "fsdp"), None, None, None)
    text_only = plan_lib.abstract_batch(plan_lib.make_task(config, "llm"), "sft", 4, tokens, data)
    assert set(text_only) == {"input_ids", "attention_mask", "loss_mask"}
    assert text_only["input_ids"].shape == (4, tokens.total)
    with pytest.raises(ValueError, match="plan model must be av or llm"):
        plan_lib.make_task(config, "vision")


def test_tiny_plan_in_process():
    config = load_config("tiny")
    plan = plan_lib.make_plan(config, {"data": 2, "fsdp": 2, "tensor": 2}, video_seconds=2,
                              text_tokens=32, remat_policies=("full",), objectives=("sft",),
                              reference=False, budget_gb=16, model="llm")
    assert plan.issues == [] and plan.model == "llm" and plan.notes == []
    assert plan.tokens.total == 2 * 6 + 4 + 32  # tiny: 56/14 = 4 -> 2 x 3 per frame, 2 audio/s
    assert plan.counts["lora"] == 2 * (64 * 8 + 8 * 64 + 2 * (64 * 8 + 8 * 32))
    # fp32 tiny base: per-device bytes are the shard sizes, below the whole and above whole / 8
    whole, per_dev = plan.state_total_gb["params"], plan.state_gb["params"]
    assert whole / 8 <= per_dev < whole
    (step,) = plan.steps
    assert step.name == "sft" and step.remat == "full" and step.temp > 0
    assert step.argument >= per_dev * plan_lib.GB  # the state is an argument of the step
    assert plan.fits("sft") and "remat_policy=full" in plan.suggestions[0]
    js = plan.to_json()
    assert js["tokens"]["total"] == plan.tokens.total and js["steps"][0]["peak"] == step.peak
    assert 0 < step.model_flops < step.flops  # full remat recomputes; no chip: no MFU
    assert plan.chip == "" and step.mfu != step.mfu and step.estimate == {}


@pytest.mark.slow
def test_tiny_plan_with_context_parallelism_in_process():
    """The sequence split over context = 2 (with fsdp and tensor): compiles, and a shard of the
    context-parallel step needs less temporary memory than the same step on the sequence whole."""
    config = load_config("tiny")
    kwargs = dict(video_seconds=2, text_tokens=256, remat_policies=("full",), objectives=("sft",),
                  reference=False, budget_gb=16, model="llm")
    whole = plan_lib.make_plan(config, {"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4],
                               **kwargs)
    split = plan_lib.make_plan(config, {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}, **kwargs)
    assert split.issues == [] and split.mesh["context"] == 2
    assert split.to_json()["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
    assert split.steps[0].temp < whole.steps[0].temp


@pytest.mark.slow
def test_7b_plan_on_64_devices_fits_v5p(tmp_path):
    """7B + LoRA DPO (with the reference path) for a 60-s video on data=1,fsdp=16,tensor=4. Only DPO
    is compiled (the largest step; SFT's plan is the tiny tests' subject), without LLVM optimisation
    (compile_only.FLAGS: the same bytes within 448 of 11.4 GB, FLOPs within 0.003 %, a third of the
    compile time)."""
    out = tmp_path / "plan.json"
    env = compile_only.env()   # measured, never run: no LLVM optimisation
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-m", "vsalmonn_jax.cli", "plan", "--config", "configs/7b.py",
         "--mesh", "data=1,fsdp=16,tensor=4", "--remat", "full", "--objectives", "dpo",
         "--device", "v5p", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(900))
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["mesh"] == {"data": 1, "fsdp": 16, "context": 1, "tensor": 4}
    assert plan["tokens"]["total"] == 11552 and plan["global_batch"] == 16
    assert plan["model"] == "av" and plan["notes"] == []  # SigLIP + Whisper + connectors + LLM
    # Qwen2-7B 7.62B + SigLIP-so400m (26 used layers) ~0.4B + Whisper-large-v3 encoder ~0.64B
    assert 8.5e9 < plan["counts"]["params"] < 8.8e9
    assert plan["counts"]["lora"] == 28 * (2 * 3584 * 128 + 2 * (3584 * 128 + 128 * 512))
    assert 5e7 < plan["counts"]["adapter"] < 1e8  # projector, Q-Former, final_linear, newline
    assert plan["counts"]["ref_adapter"] == plan["counts"]["adapter"]  # DPO snapshot
    # bf16 frozen weights (a few small fp32 tables such as Whisper's positions aside)
    assert plan["state_total_gb"]["params"] == pytest.approx(2 * plan["counts"]["params"] / 1e9,
                                                             rel=1e-3)
    assert plan["state_gb"]["params"] < plan["state_total_gb"]["params"] / 8
    trainable = plan["counts"]["lora"] + plan["counts"]["adapter"]
    assert plan["state_total_gb"]["opt_state"] == pytest.approx(8 * trainable / 1e9, rel=0.01)
    names = [s["name"] for s in plan["steps"]]
    assert names == ["dpo", "reference"]
    for step in plan["steps"]:
        assert 0 < step["peak"] <= 95e9, step
        assert 0 < step["model_flops"] <= step["flops"] and 0 < step["mfu"] <= 1, step
    by = {s["name"]: s for s in plan["steps"]}
    assert by["dpo"]["temp"] > by["reference"]["temp"]  # 3 policy sequences' forward + backward vs a forward
    assert "fits" in proc.stdout and not re.search(r"\sNO\s", proc.stdout)
    assert peak_rss_gb < 4.0, f"the plan allocated {peak_rss_gb:.1f} GB: weights materialised?"
    assert before <= resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def test_cli_usage_errors(capsys):
    from vsalmonn_jax.commands import plan as plan_cmd

    assert plan_cmd.main([]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert plan_cmd.main(["--config", "configs/7b.py", "--mesh", "fsdp=-1"]) == 2
    assert "has a -1 axis: give --devices N" in capsys.readouterr().err
    assert plan_cmd.main(["--config", "configs/7b.py", "--mesh", "data=3,fsdp=5", "--devices",
                          "16"]) == 2
    assert "has 15 devices, --devices says 16" in capsys.readouterr().err
    assert plan_cmd.main(["--config", "configs/7b.py", "--mesh", "gpu=8"]) == 2
    assert "expected data=N, fsdp=N, context=N or tensor=N" in capsys.readouterr().err
    assert plan_cmd.main(["--config", "configs/7b.py", "--mesh", "fsdp=4", "--context", "4",
                          "--devices", "8"]) == 2
    assert "'context': 4" in capsys.readouterr().err and "has 16 devices, --devices says 8"


def test_cli_progress_parallel_compiles_flops_and_mfu(tmp_path):
    """A user's tiny plan: progress lines on stderr while compiling, two compiles in two processes,
    FLOPs and an MFU estimate for the chip in the report and the JSON."""
    out = tmp_path / "plan.json"
    env = compile_only.env()   # measured, never run: no LLVM optimisation
    proc = subprocess.run(
        [sys.executable, "-m", "vsalmonn_jax.cli", "plan", "--config", "configs/tiny.py",
         "--mesh", "data=2,fsdp=2,tensor=2", "--remat", "none,full", "--objectives", "sft",
         "--no-reference", "--model", "llm", "--video-seconds", "2", "--text-tokens", "32",
         "--device", "v5e", "--jobs", "2", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(900))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "2 compile(s): sft (remat=none), sft (remat=full); 2 at a time (2 requested)" in proc.stderr
    assert re.search(r"compiling sft \(remat=full\)", proc.stderr)
    assert re.search(r"compiled sft \(remat=none\) in \d+ s", proc.stderr)
    plan = json.loads(out.read_text())
    none, full = plan["steps"]
    assert (none["remat"], full["remat"], plan["chip"]) == ("none", "full", "v5e")
    assert none["flops"] == none["model_flops"] > 0
    assert full["model_flops"] == pytest.approx(none["flops"])  # the same work without recompute
    assert full["flops"] > 1.2 * none["flops"]  # full remat recomputes the layers' forward
    for step in (none, full):
        assert 0 < step["mfu"] <= 1 and step["estimate"]["peak_flops"] == 197e12
        assert step["estimate"]["step_s"] == max(step["estimate"]["compute_s"],
                                                 step["estimate"]["comm_s"])
    assert full["mfu"] < none["mfu"]
    assert "MFU v5e" in proc.stdout and "step time = max(compute, communication)" in proc.stdout
    assert "sft: model.llm.remat_policy=none (the fastest compiled policy" in proc.stdout
