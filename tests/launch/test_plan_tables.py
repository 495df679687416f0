"""launch/plan_tables.py: the README's 7B table and the per-cluster recommended mesh are rebuilt from
plan JSONs between their markers; a row without a JSON says how to make it, never a figure."""

import importlib.util
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("plan_tables", REPO / "launch" / "plan_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_write_fills_the_table_from_json(tmp_path, monkeypatch):
    tables = _module()
    monkeypatch.setattr(tables, "PLANS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tables.BEGIN}\nold hand-written row\n{tables.END}\n"
                      f"{tables.REC_BEGIN}{tables.REC_END}\noutro\n")
    monkeypatch.setattr(tables, "README", readme)
    monkeypatch.setattr(tables, "RECIPE", readme)
    step = lambda name, peak: {"name": name, "peak": peak, "flops": 3.1e15, "mfu": 0.612}
    (tmp_path / "v5p64_60s.json").write_text(json.dumps({
        "budget_gb": 95.0, "global_batch": 16, "chip": "v5p", "seconds": 171.4,
        "tokens": {"frames": 60, "total": 11552},
        "state_gb": {"params": 0.25, "lora": 0.05, "opt_state": 0.2},
        "steps": [step("sft", 30.04e9), step("dpo", 121.3e9), step("reference", 13.2e9)]}))
    assert tables.main(["write"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "hand-written" not in text
    row = next(line for line in text.splitlines() if "60 frames (11,552)" in line)
    assert "16 videos/step" in row and "| 0.5 GB |" in row and "**30.0 GB**" in row
    assert "121.3 GB: does not fit" in row and "**13.2 GB**" in row
    assert "3100 / 61% (v5p)" in row and "| 171 s |" in row
    assert "not planned yet: `python launch/plan_tables.py run --only h100x8_60s`" in text
    assert tables.main(["run", "--only", "nope"]) == 2


def _plan(mesh, budget, frames, **peaks):
    return {"mesh": mesh, "budget_gb": budget, "global_batch": mesh["data"] * mesh["fsdp"],
            "chip": "v5e", "tokens": {"frames": frames, "total": 20772}, "state_gb": {"params": 1.0},
            "steps": [{"name": n, "peak": p * 1e9, "flops": 1e14, "mfu": m} for n, (p, m) in
                      peaks.items()]}


def test_recommend_picks_the_fitting_mesh_with_headroom_and_scales_data(tmp_path, monkeypatch):
    tables = _module()
    monkeypatch.setattr(tables, "PLANS", tmp_path)
    small = {"data": 1, "fsdp": 4, "context": 4, "tensor": 1}     # 16 devices, 4 videos/step
    big = {"data": 1, "fsdp": 4, "context": 4, "tensor": 4}       # 64 devices, 4 videos/step
    plans = {"v5e16_110f": _plan(small, 16.0, 110, sft=(9.0, 0.7), dpo=(14.5, 0.8)),
             "v5e64_110f": _plan(big, 16.0, 110, sft=(8.0, 0.6), dpo=(13.0, 0.5))}
    cluster = tables.Cluster("v5e-256", 256, ("v5e64_110f", "v5e16_110f"))
    # SFT: both fit 16 GB with 10 % headroom; 4 x 4 = 16 videos per step beat 4 x 16 = 64,
    # a higher MFU notwithstanding
    assert tables.recommend(cluster, "sft", plans) == (
        "data=4 fsdp=4 context=4 tensor=4, 16 videos/step: **8.0 GB** of 16, MFU 60% "
        "(row v5e64_110f, data x4)")
    # as many videos per step: the higher MFU wins
    twin = tables.Cluster("v5e-16", 16, ("a", "b"))
    twins = {"a": _plan(small, 16.0, 110, sft=(8.0, 0.6)), "b": _plan(small, 16.0, 110, sft=(9.0, 0.7))}
    assert tables.recommend(twin, "sft", twins) == (
        "data=1 fsdp=4 context=4, 4 videos/step: **9.0 GB** of 16, MFU 70% (row b)")
    # DPO: 14.5 GB leaves less than 10 % of 16 GB free
    assert tables.recommend(cluster, "dpo", plans).startswith("data=4 fsdp=4 context=4 tensor=4, ")
    plans["v5e64_110f"] = _plan(big, 16.0, 110, dpo=(15.0, 0.9))
    assert tables.recommend(cluster, "dpo", plans) == (
        "none planned fits with 10% headroom (best: data=16 fsdp=4 context=4, 14.5 GB of 16; "
        "row v5e16_110f)")
    # wrong frame count, a mesh the cluster does not divide, or no JSON: not a recommendation
    assert tables.recommend(tables.Cluster("x", 256, ("a",)), "sft", {"a": _plan(
        small, 16.0, 60, sft=(1.0, 0.9))}).startswith("not planned: `python launch/plan_tables.py run --only a`")
    assert tables.recommend(tables.Cluster("x", 24, ("a",)), "sft", {"a": _plan(
        big, 16.0, 110, sft=(1.0, 0.9))}).startswith("not planned")
    assert tables.recommend(tables.Cluster("x", 16, ("a",)), "sft", {}).startswith("not planned")


def test_write_fills_the_recommendations_in_both_documents(tmp_path, monkeypatch):
    tables = _module()
    monkeypatch.setattr(tables, "PLANS", tmp_path)
    docs = {}
    for name in ("README", "RECIPE"):
        docs[name] = tmp_path / f"{name}.md"
        docs[name].write_text(f"a\n{tables.BEGIN}\n{tables.END}\nb\n{tables.REC_BEGIN}\nold\n"
                              f"{tables.REC_END}\nc\n")
        monkeypatch.setattr(tables, name, docs[name])
    (tmp_path / "h100x8_110f.json").write_text(json.dumps(_plan(
        {"data": 1, "fsdp": 2, "tensor": 4}, 80.0, 110, sft=(30.0, 0.8), dpo=(75.0, 0.8))))
    assert tables.main(["write"]) == 0
    for path in docs.values():
        text = path.read_text()
        assert "\nold\n" not in text and text.endswith("\nc\n")
        rows = {line.split(" | ")[0]: line for line in text.splitlines() if "H100" in line}
        assert ("data=8 fsdp=2 tensor=4, 16 videos/step: **30.0 GB** of 80, MFU 80% "
                "(row h100x8_110f, data x8)"
                in rows["| 64 x H100 (8 nodes)"])
        assert "none planned fits with 10% headroom" in rows["| 8 x H100 (one node)"]
    docs["RECIPE"].write_text("no markers\n")
    assert tables.main(["write"]) == 2
