"""launch/plan_tables.py: the README's 7B table is rebuilt from plan JSONs between its markers;
a row without a JSON says how to make it, never a figure."""

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
    readme.write_text(f"intro\n{tables.BEGIN}\nold hand-written row\n{tables.END}\noutro\n")
    monkeypatch.setattr(tables, "README", readme)
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
