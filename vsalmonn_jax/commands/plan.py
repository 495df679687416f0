"""`vsalmonn-jax plan`: per-device memory of a config on a mesh, without allocating the weights.

Runs itself again in a child process with N fake CPU devices (XLA_FLAGS), so a 64-device TPU or GPU
mesh is planned on a laptop. Exit status 0: every objective fits; 1: something does not; 2: usage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD_ENV = "VSALMONN_PLAN_DEVICES"


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=16,tensor=4' -> {"data": 1, "fsdp": 16, "context": 1, "tensor": 4} (missing axes
    = 1, -1 = rest)."""
    out = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in out:
            raise ValueError(f"--mesh item {part!r}: expected data=N, fsdp=N, context=N or tensor=N")
        try:
            out[name] = int(value)
        except ValueError as err:
            raise ValueError(f"--mesh item {part!r}: {value!r} is not an integer") from err
        if out[name] == 0 or out[name] < -1:
            raise ValueError(f"--mesh item {part!r}: sizes are positive (or -1 = the rest)")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsalmonn-jax plan", description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="", help="data=..,fsdp=..,context=..,tensor=.. (default: config.mesh)")
    p.add_argument("--context", type=int, default=0, help="context-parallel shards of each sequence "
                   "(overrides the mesh's context; launch/README.md 'Context parallelism')")
    p.add_argument("--devices", type=int, default=0,
                   help="number of devices (default: the product of --mesh; needed with -1)")
    p.add_argument("--video-seconds", type=float, default=60.0)
    p.add_argument("--text-tokens", type=int, default=512, help="prompt + response tokens")
    p.add_argument("--global-batch", type=int, default=0,
                   help="sequences per step (default: one per data x fsdp shard)")
    p.add_argument("--target-global-batch", type=int, default=0,
                   help="sequences per optimizer update, for the grad_accum suggestion")
    p.add_argument("--remat", default="none,dots,full", help="remat policies to compile for SFT "
                   "(none, dots, save_names, offload_names, full); DPO uses the last")
    p.add_argument("--objectives", default="sft,dpo")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the compile of the DPO reference forward alone")
    p.add_argument("--precomputed-ref", action="store_true",
                   help="also compile the DPO step with reference log-probs given in the batch")
    p.add_argument("--device", default="v5p", help="chip: memory budget and the peak FLOP/s and "
                   "link bandwidth of the MFU estimate: " + ", ".join(
                       ["v4", "v5e", "v5p", "v6e", "a100-40", "a100-80", "h100", "h200"]))
    p.add_argument("--device-memory-gb", type=float, default=0.0, help="overrides --device's HBM")
    p.add_argument("--link-gb-s", type=float, default=0.0, help="overrides --device's interconnect "
                   "GB/s per device and direction (e.g. ~50 for 400 Gb/s InfiniBand between nodes)")
    p.add_argument("--jobs", type=int, default=0, help="compiles at once, each in its own process "
                   "(default 0: as many as the cores and the available host memory allow, 4 GB each)")
    p.add_argument("--model", default="auto", choices=("auto", "av", "llm"),
                   help="av: encoders + connectors + LLM; llm: the LLM alone; auto: av, else llm")
    p.add_argument("--json", default="", help="also write the plan as JSON here")
    return p


def _resolve(args, config) -> tuple[dict[str, int], int]:
    mesh = parse_mesh(args.mesh) if args.mesh else {k: int(config.mesh.get(k, 1)) for k in
                                                    ("data", "fsdp", "context", "tensor")}
    if args.context:
        if args.context < 1:
            raise ValueError(f"--context {args.context}: a positive number of shards")
        mesh["context"] = args.context
    known = 1
    for v in mesh.values():
        known *= v if v > 0 else 1
    if -1 in mesh.values():
        if not args.devices:
            raise ValueError(f"mesh {mesh} has a -1 axis: give --devices N")
        if args.devices % known:
            raise ValueError(f"--devices {args.devices} is not a multiple of {known} (mesh {mesh})")
        mesh = {k: (args.devices // known if v == -1 else v) for k, v in mesh.items()}
    devices = mesh["data"] * mesh["fsdp"] * mesh["context"] * mesh["tensor"]
    if args.devices and args.devices != devices:
        raise ValueError(f"mesh {mesh} has {devices} devices, --devices says {args.devices}")
    return mesh, devices


def _run_child(argv: list[str], devices: int) -> int:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = str(devices)
    return subprocess.call([sys.executable, "-m", "vsalmonn_jax.commands.plan", *argv], env=env)


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import load_config, split_config_args
    from vsalmonn_jax.config_check import validate

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    if not config_path:
        print("vsalmonn-jax plan: --config is required (e.g. --config configs/7b.py)", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path, overrides)
        validate(config)   # ConfigError is a ValueError
        mesh, devices = _resolve(args, config)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"vsalmonn-jax plan: {err}", file=sys.stderr)
        return 2
    if os.environ.get(CHILD_ENV) != str(devices):
        return _run_child(argv, devices)

    import jax

    from vsalmonn_jax import plan as plan_lib

    if jax.device_count() != devices:
        print(f"vsalmonn-jax plan: expected {devices} devices, jax sees {jax.device_count()}",
              file=sys.stderr)
        return 2
    chip = args.device.lower() if args.device.lower() in plan_lib.DEVICE_MEMORY_GB else ""
    budget = args.device_memory_gb or plan_lib.DEVICE_MEMORY_GB.get(chip, 0.0)
    if not budget:
        print(f"vsalmonn-jax plan: unknown --device {args.device!r}; give --device-memory-gb",
              file=sys.stderr)
        return 2
    remat = tuple(filter(None, args.remat.split(",")))
    bad = [r for r in remat if r not in plan_lib.REMAT_ORDER]
    if bad:
        print(f"vsalmonn-jax plan: unknown remat policy {bad}; expected {plan_lib.REMAT_ORDER}",
              file=sys.stderr)
        return 2
    objectives = tuple(filter(None, args.objectives.split(",")))
    if not objectives or any(o not in ("sft", "dpo") for o in objectives):
        print(f"vsalmonn-jax plan: --objectives must be sft and/or dpo, got {args.objectives!r}",
              file=sys.stderr)
        return 2
    plan = plan_lib.make_plan(
        config, mesh, video_seconds=args.video_seconds, text_tokens=args.text_tokens,
        global_batch=args.global_batch or None, remat_policies=remat, objectives=objectives,
        reference=not args.no_reference, precomputed_reference=args.precomputed_ref,
        budget_gb=budget, model=args.model, chip=chip, link_gb_s=args.link_gb_s or None,
        jobs=args.jobs, target_global_batch=args.target_global_batch or None)
    print(plan_lib.format_plan(plan), flush=True)
    print(f"plan took {plan.seconds:.0f} s (load average "
          f"{', '.join(f'{x:.1f}' for x in plan.load_average) or 'unknown'})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
    ok = not plan.issues and all(plan.fits(o) for o in objectives)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
