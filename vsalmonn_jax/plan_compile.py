"""AOT compiles for `plan`: one train step (or the DPO reference forward) on abstract inputs ->
per-device memory and FLOPs, with progress lines while XLA works, several compiles in parallel processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from vsalmonn_jax.plan_flops import matmul_flops
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, make_mesh

# Host memory one 7B compile takes (peak RSS measured < 4 GB, tests/launch/test_plan.py): the bound
# for how many compiles run at once.
COMPILE_HOST_GB = 4.0
PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass
class Compiled:
    name: str
    remat: str
    argument: int
    output: int
    alias: int
    temp: int
    seconds: float
    flops: float = 0.0        # matmul FLOPs per device (jaxpr count / devices), recompute included
    model_flops: float = 0.0  # the same with remat_policy=none: the work the step needs
    xla_flops: float = 0.0    # compiled.cost_analysis()["flops"]: loop bodies counted once
    mfu: float = math.nan     # on-paper MFU on the plan's chip (plan_flops.OVERLAP_MODEL)
    estimate: dict = dataclasses.field(default_factory=dict)  # compute_s, comm_s, comm_bytes, ...

    @property
    def peak(self) -> int:
        """Live bytes at the step's high-water mark: inputs + (outputs not aliased to inputs) + temp."""
        return self.argument + max(0, self.output - self.alias) + self.temp


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: objective sft | dpo, remat policy, what (train | reference), precomputed ref."""
    objective: str
    remat: str
    what: str = "train"
    precomputed_reference: bool = False

    @property
    def label(self) -> str:
        return f"{self.what if self.what == 'reference' else self.objective} (remat={self.remat})"


def say(message: str) -> None:
    """A progress line on stderr, flushed at once (stdout stays the report)."""
    print(f"plan [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Ticker:
    """Prints 'still compiling <label>, N s' every PROGRESS_EVERY_S until stopped."""

    def __init__(self, label: str):
        self.label, self.start, self.stop = label, time.perf_counter(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(PROGRESS_EVERY_S):
            say(f"still compiling {self.label}: {time.perf_counter() - self.start:.0f} s")

    def __enter__(self):
        say(f"compiling {self.label}")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def _memory(compiled) -> tuple[int, int, int, int]:
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory_analysis() for compiled programs")
    return (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))


def _traced_step(config, mesh, objective: str, batch: int, tokens, what: str,
                 precomputed_reference: bool, model: str, rules):
    """jit(step).trace(abstract state, abstract batch), traced inside the mesh and logical rules."""
    from vsalmonn_jax.plan import abstract_batch, make_task
    from vsalmonn_jax.training import state as state_lib
    from vsalmonn_jax.training import steps as steps_lib

    task = make_task(config, model)
    tx, schedule = state_lib.make_optimizer(config.train, max(1, int(config.train.num_steps)))
    abstract, shardings = state_lib.state_shardings(task, config, tx, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(abstract), shardings)
    steps = steps_lib.make_steps(task, config, tx, schedule, mesh, shardings, objective=objective,
                                 rules=rules)
    inputs = abstract_batch(task, objective, batch, tokens, steps.batch_sharding,
                            precomputed_reference)
    if what == "reference":
        opts = steps_lib.StepOptions.from_config(config)

        def reference(state, batch_):
            media = steps_lib._encode(task, state.params, batch_)
            return steps_lib.reference_logps(task, opts, state, batch_, media)

        fn = jax.jit(reference, in_shardings=(shardings, steps.batch_sharding))
    else:
        fn = steps.train.jitted
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn.trace(target, inputs)


def _with_remat(config, remat: str):
    config = config.copy_and_resolve_references()
    config.model.llm.remat_policy = remat
    return config


def compile_step(config, mesh, objective: str, batch: int, tokens, *, what: str = "train",
                 precomputed_reference: bool = False, model: str = "av",
                 rules=LOGICAL_AXIS_RULES) -> Compiled:
    """Lower + compile one train step (or the DPO reference forward, `what="reference"`) on
    abstract inputs; return its per-device memory and FLOPs."""
    start = time.perf_counter()
    remat = str(config.model.llm.remat_policy)
    label = Job(objective, remat, what, precomputed_reference).label
    recomputes = remat != "none" and what != "reference"  # a forward alone recomputes nothing
    say(f"tracing {label}" + (", and without remat for its model FLOPs" if recomputes else ""))
    traced = _traced_step(config, mesh, objective, batch, tokens, what, precomputed_reference,
                          model, rules)
    flops = matmul_flops(traced.jaxpr)
    model_flops = flops if not recomputes else matmul_flops(_traced_step(
        _with_remat(config, "none"), mesh, objective, batch, tokens, what,
        precomputed_reference, model, rules).jaxpr)
    with _Ticker(label), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = traced.lower().compile()
    arg, out, alias, temp = _memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    name = what if what == "reference" else objective + ("+precomputed_ref" if precomputed_reference
                                                         else "")
    seconds = time.perf_counter() - start
    say(f"compiled {label} in {seconds:.0f} s")
    devices = mesh.devices.size
    return Compiled(name, remat, arg, out, alias, temp, seconds, flops / devices,
                    model_flops / devices, float((cost or {}).get("flops", 0.0)))


def run_job(config, mesh_spec: Mapping[str, int], job: Job, batch: int, tokens, model: str,
            devices: Sequence[jax.Device] | None = None) -> Compiled:
    cfg = _with_remat(config, job.remat)
    cfg.stage = "dpo" if job.what == "reference" else job.objective
    mesh = make_mesh(mesh_spec, devices if devices is not None else
                     jax.devices()[:int(_product(mesh_spec))])
    return compile_step(cfg, mesh, job.objective, batch, tokens, what=job.what,
                        precomputed_reference=job.precomputed_reference, model=model)


def _product(spec: Mapping[str, int]) -> int:
    out = 1
    for v in spec.values():
        out *= int(v)
    return out


def parallel_jobs(requested: int, n_jobs: int) -> tuple[int, str]:
    """How many compiles run at once: `requested` (> 0), or as many as the cores and the available
    host memory (COMPILE_HOST_GB each) allow. Returns (workers, why)."""
    if requested > 0:
        return min(requested, n_jobs), f"{requested} requested"
    cores = os.cpu_count() or 1
    available = _available_gb()
    by_memory = max(1, int(available // COMPILE_HOST_GB))
    workers = max(1, min(n_jobs, cores, by_memory))
    return workers, (f"{cores} cores, {available:.0f} GB available / {COMPILE_HOST_GB:.0f} GB "
                     f"per compile")


def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return COMPILE_HOST_GB  # unknown: one at a time


def run_jobs(config, mesh_spec: Mapping[str, int], jobs: Sequence[Job], batch: int, tokens,
             model: str, workers: int = 1, devices=None) -> list[Compiled]:
    """Compile every job, in this process (workers=1) or in `workers` spawned processes that see the
    same (fake) devices through the inherited XLA_FLAGS. Results keep the order of `jobs`."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(config, mesh_spec, j, batch, tokens, model, devices) for j in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, config, dict(mesh_spec), j, batch, tokens, model)
                   for j in jobs]
        return [f.result() for f in futures]
