"""Regenerate launch/README.md's 7B memory / FLOPs tables from `vsalmonn-jax plan --json` outputs.

    python launch/plan_tables.py run [--only NAME ...] [--force]   # plan each row -> launch/plans/NAME.json
    python launch/plan_tables.py write                             # JSONs -> the README tables

`write` replaces what lies between the `plan-tables` markers in launch/README.md and the
`plan-recommend` markers in launch/README.md and docs/recipe.md (the recommended mesh per cluster,
chosen from the rows' JSONs by `recommend`); a row whose JSON is missing says so (no figure is ever
typed by hand). `run` skips rows that already have a JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

from vsalmonn_jax.plan_report import HEADROOM  # what plan's suggestions leave free, 10 %

HERE = pathlib.Path(__file__).resolve().parent
PLANS = HERE / "plans"
README = HERE / "README.md"
RECIPE = HERE.parent / "docs" / "recipe.md"
BEGIN, END = "<!-- plan-tables:begin -->", "<!-- plan-tables:end -->"
REC_BEGIN, REC_END = "<!-- plan-recommend:begin -->", "<!-- plan-recommend:end -->"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    hardware: str
    device: str           # plan --device: memory budget and the chip of the MFU estimate
    mesh: str
    video_seconds: float
    objectives: str = "sft,dpo"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vsalmonn_jax.cli", "plan", "--config", "configs/7b.py",
                "--mesh", self.mesh, "--video-seconds", f"{self.video_seconds:g}", "--remat", "full",
                "--objectives", self.objectives, "--device", self.device,
                "--json", str(PLANS / f"{self.name}.json")]


ROWS = (
    Row("v5p64_60s", "v5p-128 (64 chips)", "v5p", "data=1,fsdp=16,tensor=4", 60),
    Row("v5p64_110f", "v5p-128 (64 chips)", "v5p", "data=1,fsdp=16,tensor=4", 110),
    Row("h100x8_60s", "8 x H100", "h100", "data=1,fsdp=2,tensor=4", 60),
    Row("h100x8_110f", "8 x H100", "h100", "data=1,fsdp=2,tensor=4", 110),
    Row("tensor1_64_60s", "64 chips, tensor=1 (the trap)", "v5p", "data=1,fsdp=64,tensor=1", 60),
    Row("v5e64_110f", "v5e-64 (a quarter of v5e-256)", "v5e", "data=1,fsdp=4,context=4,tensor=4", 110),
    Row("v5e16_110f", "v5e-16 (stretch)", "v5e", "data=1,fsdp=4,context=4", 110, "dpo"),
    Row("v5e16_t4_110f", "v5e-16 (stretch)", "v5e", "data=1,fsdp=1,context=4,tensor=4", 110, "dpo"),
    Row("h100x8_fsdp8_110f", "8 x H100", "h100", "data=1,fsdp=8", 110),
)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A cluster shape and the planned rows it may run: one planned mesh replicated over `data`."""
    name: str
    devices: int
    rows: tuple[str, ...]
    frames: int = 110


CLUSTERS = (
    Cluster("v5p-64 (v5p-128 slice)", 64, ("v5p64_110f",)),
    Cluster("v5e-256", 256, ("v5e64_110f", "v5e16_110f", "v5e16_t4_110f")),
    Cluster("8 x H100 (one node)", 8, ("h100x8_110f", "h100x8_fsdp8_110f")),
    Cluster("64 x H100 (8 nodes)", 64, ("h100x8_110f", "h100x8_fsdp8_110f")),
)


def run(names: list[str], force: bool) -> int:
    PLANS.mkdir(exist_ok=True)
    status = 0
    for row in ROWS:
        if (names and row.name not in names) or ((PLANS / f"{row.name}.json").exists() and not force):
            continue
        start = time.perf_counter()
        print(f"plan_tables: {row.name}: {' '.join(row.command()[2:])}", flush=True)
        # compile cache off: the `plan wall time` column is a cold plan, whatever ran before
        code = subprocess.call(row.command(), cwd=HERE.parent,
                               env={**os.environ, "VSALMONN_JAX_CACHE_DIR": "off"})
        print(f"plan_tables: {row.name} exit {code} after {time.perf_counter() - start:.0f} s "
              f"(load average {' '.join(f'{x:.1f}' for x in _load())})", flush=True)
        status = status or (code not in (0, 1))  # 1 = planned, something does not fit
    return int(status)


def _load() -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


def _gb(step: dict | None, budget: float) -> str:
    if step is None:
        return "-"
    peak = step["peak"] / 1e9
    return f"**{peak:.1f} GB**" if peak <= budget else f"{peak:.1f} GB: does not fit"


def _mfu(step: dict | None) -> str:
    if step is None or step.get("mfu") is None:
        return "-"
    return f"{step['flops'] / 1e12:.0f} / {step['mfu']:.0%}"


def _wall(plan: dict) -> str:
    load = plan.get("load_average") or []
    return f"{plan.get('seconds', 0):.0f} s" + (f" (load {load[0]:.0f})" if load else "")


def table() -> str:
    lines = ["| hardware, mesh | video (LLM tokens) | weights + trainables + Adam | SFT step | "
             "DPO step | DPO reference forward | DPO TFLOP/device / MFU | plan wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in ROWS:
        path = PLANS / f"{row.name}.json"
        if not path.exists():
            lines.append(f"| {row.hardware}: {row.mesh} | {row.video_seconds:g} s | not planned "
                         f"yet: `python launch/plan_tables.py run --only {row.name}` | | | | | |")
            continue
        plan = json.loads(path.read_text())
        steps = {s["name"]: s for s in plan["steps"]}
        budget, tokens = plan["budget_gb"], plan["tokens"]
        state = sum(plan["state_gb"].values())
        video = (f"{tokens['frames']} frames ({tokens['total']:,})")
        lines.append(
            f"| {row.hardware}: {row.mesh.replace(',', ' ')}, {plan['global_batch']} videos/step | "
            f"{video} | {state:.1f} GB | {_gb(steps.get('sft'), budget)} | "
            f"{_gb(steps.get('dpo'), budget)} | {_gb(steps.get('reference'), budget)} | "
            f"{_mfu(steps.get('dpo'))} ({plan.get('chip', '-')}) | {_wall(plan)} |")
    lines.append("")
    lines.append(f"(generated by `python launch/plan_tables.py write` from launch/plans/*.json on "
                 f"{platform.machine()}; peak per device, `--remat full`; MFU under the overlap "
                 f"model printed by `plan`; wall time with the compile cache off, at the load "
                 f"average shown)")
    return "\n".join(lines)


def _plans() -> dict[str, dict]:
    return {row.name: json.loads((PLANS / f"{row.name}.json").read_text())
            for row in ROWS if (PLANS / f"{row.name}.json").exists()}


def _mesh_text(mesh: dict, data: int = 1) -> str:
    mesh = dict(mesh, data=mesh.get("data", 1) * data)
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v != 1 or k in ("data", "fsdp"))


def recommend(cluster: Cluster, objective: str, plans: dict[str, dict]) -> str:
    """The planned mesh for `objective` on `cluster`: of its rows planned at its frame count whose
    peak leaves HEADROOM free, the fewest videos per step on the cluster (the rule of "Choosing a
    mesh": keep videos per step small), then the highest MFU, then the lowest peak; its data axis
    scaled up to the cluster. Else why none."""
    fits, misses = [], []
    for name in cluster.rows:
        plan = plans.get(name)
        step = next((s for s in (plan or {}).get("steps", []) if s["name"] == objective), None)
        devices = math.prod(plan["mesh"].values()) if plan else 0
        if step is None or plan["tokens"]["frames"] != cluster.frames or cluster.devices % devices:
            continue
        data = cluster.devices // devices
        videos = plan["global_batch"] * data
        entry = (-videos, step.get("mfu") or 0.0, -step["peak"], name, videos, data)
        (fits if step["peak"] <= plan["budget_gb"] * 1e9 * (1 - HEADROOM) else misses).append(entry)
    if not fits:
        if not misses:
            return f"not planned: `python launch/plan_tables.py run --only {' '.join(cluster.rows)}`"
        *_, name, videos, data = max(misses, key=lambda e: e[2])  # the lowest peak
        plan, step = plans[name], _step(plans[name], objective)
        return (f"none planned fits with {HEADROOM:.0%} headroom (best: {_mesh_text(plan['mesh'], data)}"
                f", {step['peak'] / 1e9:.1f} GB of {plan['budget_gb']:.0f}; row {name})")
    *_, name, videos, data = max(fits)
    plan, step = plans[name], _step(plans[name], objective)
    scaled = f", data x{data}" if data > 1 else ""
    return (f"{_mesh_text(plan['mesh'], data)}, {videos} videos/step: **{step['peak'] / 1e9:.1f} GB**"
            f" of {plan['budget_gb']:.0f}, MFU {step.get('mfu') or 0:.0%} (row {name}{scaled})")


def _step(plan: dict, name: str) -> dict:
    return next(s for s in plan["steps"] if s["name"] == name)


def recommendations() -> str:
    plans = _plans()
    lines = ["| cluster | 7B SFT, 110 frames | 7B DPO, 110 frames |", "| --- | --- | --- |"]
    lines += [f"| {c.name} | {recommend(c, 'sft', plans)} | {recommend(c, 'dpo', plans)} |"
              for c in CLUSTERS]
    lines += ["", f"(generated by `python launch/plan_tables.py write` from launch/plans/*.json: "
              f"per cluster, of the planned meshes whose peak per device leaves {HEADROOM:.0%} of the "
              f"HBM free, the fewest videos per step, then the highest on-paper MFU; a cluster larger than the planned mesh runs it "
              f"replicated over `data` (same peak per device; the MFU is the planned mesh's, "
              f"without the data all-reduce of the ~0.5 GB fp32 trainable gradients); "
              f"`--remat full`, 1 video per data x fsdp shard)"]
    return "\n".join(lines)


def _fill(path: pathlib.Path, begin: str, end: str, body: str) -> bool:
    text = path.read_text()
    if begin not in text or end not in text:
        print(f"plan_tables: {path} has no {begin} ... {end} markers", file=sys.stderr)
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    return True


def write() -> int:
    recommended = recommendations()
    ok = all([_fill(README, BEGIN, END, table()),
              _fill(README, REC_BEGIN, REC_END, recommended),
              _fill(RECIPE, REC_BEGIN, REC_END, recommended)])
    print(f"plan_tables: wrote the tables of {README} and {RECIPE}" if ok else
          "plan_tables: markers missing, see above")
    return 0 if ok else 2


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("run", "write"))
    p.add_argument("--only", nargs="*", default=[], help="row names: " + ", ".join(
        r.name for r in ROWS))
    p.add_argument("--force", action="store_true", help="re-plan rows that have a JSON")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - {r.name for r in ROWS})
    if unknown:
        print(f"plan_tables: unknown rows {unknown}", file=sys.stderr)
        return 2
    return run(args.only, args.force) if args.action == "run" else write()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
