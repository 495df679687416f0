"""One process of the multi-host test: tiny Qwen2 + LoRA, a few SFT then DPO steps on a fixed mesh.

Started by test_multiprocess.py as 2 processes x 4 fake CPU devices (explicit JAX_* env) or as one
process x 8 devices; both write losses, trainables, reference log-probs (the mrDPO per-round file),
a checkpoint and a merged export to compare.
usage: mp_worker.py OUT_DIR [--restore-from DIR] [--export-from DIR] [--mesh data=1,fsdp=2,context=2,...]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402

from vsalmonn_jax import distributed  # noqa: E402

SPEC = distributed.initialize()  # before any other jax use

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from vsalmonn_jax.commands import train as train_command  # noqa: E402
from vsalmonn_jax.commands.plan import parse_mesh  # noqa: E402
from vsalmonn_jax.config import load_config  # noqa: E402
from vsalmonn_jax.data import pipeline  # noqa: E402
from vsalmonn_jax.data.features import resize_bicubic_uint8  # noqa: E402
from vsalmonn_jax.lora import merge  # noqa: E402
from vsalmonn_jax.models.qwen2 import load_hf, save_hf  # noqa: E402
from vsalmonn_jax.training import state as state_lib  # noqa: E402
from vsalmonn_jax.training import steps as steps_lib  # noqa: E402
from vsalmonn_jax.training import synthetic  # noqa: E402
from vsalmonn_jax.training.checkpoint import Checkpointer  # noqa: E402
from vsalmonn_jax.training.host_batches import DataErrorElsewhere, agree, report_failure  # noqa: E402
from vsalmonn_jax.training.loop import device_batch, evaluate, prepare_state  # noqa: E402
from vsalmonn_jax.training.round_reference import (  # noqa: E402
    REFERENCE_FIELDS,
    batch_reference,
    save_reference,
)
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, make_mesh  # noqa: E402
from vsalmonn_jax.training.task import build_task  # noqa: E402

MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # --mesh overrides (e.g. with context parallelism)
GLOBAL_BATCH = 8
SFT_STEPS = 3
DPO_STEPS = 2
REFERENCE_ROWS = 12   # two global batches, the second padded with copies of row 11


def local_rows(batch: dict, mesh) -> dict:
    """This process's rows of a global numpy batch (what its data loader would have produced)."""
    start, stop = distributed.process_batch_rows(GLOBAL_BATCH, mesh)
    return {k: v[start:stop] for k, v in batch.items() if k != "example_id"}


def continued_adapter(mesh) -> tuple[jax.Array, np.ndarray]:
    """prepare_state (the start of a DPO stage or mrDPO round) on a state whose adapter kernel is
    split over every device: (its reference snapshot, [process count, fully addressable])."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    split, whole = NamedSharding(mesh, P(tuple(mesh.axis_names))), NamedSharding(mesh, P())
    values = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    kernel = jax.make_array_from_callback((8, 4), split, lambda index: values[index])
    tx = optax.adam(1e-3)
    trainable = {"adapter": {"w": kernel}}
    state = state_lib.TrainState(step=np.zeros((), np.int32), params={}, trainable=trainable,
                                 opt_state=tx.init(trainable), rng=jax.random.PRNGKey(0),
                                 ref_adapter={})
    shardings = state_lib.TrainState(
        step=whole, params={}, trainable={"adapter": {"w": split}},
        opt_state=jax.tree.map(lambda x: split if x.ndim == 2 else whole, tx.init(trainable)),
        rng=whole, ref_adapter={"w": split})
    config = load_config("tiny", ["stage=dpo", "dpo.reference=snapshot"])
    state, _ = prepare_state(None, config, tx, mesh, state=state, shardings=shardings)
    return state.ref_adapter["w"], np.asarray([jax.process_count(), kernel.is_fully_addressable])


def run(out: pathlib.Path, restore_from: str | None, export_from: str | None, mesh_spec: dict) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    config = load_config("tiny", ["train.lr=0.01", "train.warmup_ratio=0.0", "train.num_steps=10"])
    with config.unlocked():
        config.mesh.update(mesh_spec)
    mesh = make_mesh(mesh_spec)
    task = build_task(config, text_only=True)
    tx, schedule = state_lib.make_optimizer(config.train, 10)
    state, shardings = state_lib.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
    sft = steps_lib.make_steps(task, config, tx, schedule, mesh, shardings, objective="sft")
    dpo = steps_lib.make_steps(task, config, tx, schedule, mesh, shardings, objective="dpo")
    vocab = int(config.model.llm.vocab_size)
    losses = []
    for i in range(SFT_STEPS):
        batch = synthetic.sft_examples(GLOBAL_BATCH, vocab, length=16, seed=i)
        state, metrics = sft.train(state, distributed.global_batch(local_rows(batch, mesh), mesh))
        losses.append(float(metrics["loss"]))
    for i in range(DPO_STEPS):  # through the train loop's batch placement (steps.put_batch)
        batch = synthetic.dpo_examples(GLOBAL_BATCH, vocab, length=16, seed=100 + i)
        state, metrics = dpo.train(state, steps_lib.put_batch(local_rows(batch, mesh), dpo.batch_sharding))
        losses.append(float(metrics["loss"]))
    # each process's data shard and rows per step, as the train CLI and the data loader see them
    config.data.batch_size = GLOBAL_BATCH // (mesh.shape["data"] * mesh.shape["fsdp"])
    shard = [*distributed.batch_shard(mesh), distributed.local_batch_shards(mesh),
             train_command._local_batch(config), *pipeline.host_shard(config)]
    shards = multihost_utils.process_allgather(np.asarray(shard, np.int64))
    # processes that share a batch shard must load the same rows: the same batch passes, a
    # different example id on the last process stops every process (no silent splice, no hang)
    start, stop = distributed.process_batch_rows(GLOBAL_BATCH, mesh)
    probe = {k: v[start:stop] for k, v in synthetic.sft_examples(GLOBAL_BATCH, vocab, 16, seed=0).items()}
    device_batch(probe, sft)
    if jax.process_index() == jax.process_count() - 1:
        probe["example_id"] = probe["example_id"] + 1
    try:
        device_batch(probe, sft)
        mismatch = ""
    except RuntimeError as err:
        mismatch = str(err)
    raised = multihost_utils.process_allgather(np.asarray([bool(mismatch)], np.int32))
    # batches of different shapes (the last process's text 16 tokens longer, as its own bucket):
    # every process pads to the largest, the loss is unchanged; a field only one process has stops all
    probe["example_id"] = probe["example_id"] - (jax.process_index() == jax.process_count() - 1)
    same_loss = evaluate(sft, state, [probe])["loss"]
    own_rows = distributed.batch_shard(mesh)[1] == jax.process_count()   # sharing rows: same shapes
    if own_rows and jax.process_index() == jax.process_count() - 1:
        probe = {k: np.pad(v, [(0, 0), (0, 16)]) if v.ndim == 2 else v for k, v in probe.items()}
    padded_loss = evaluate(sft, state, [probe])["loss"]
    if jax.process_index() == jax.process_count() - 1:
        probe["answer"] = np.zeros(len(probe["example_id"]), np.int32)
    try:
        device_batch(probe, sft)
        fields = ""
    except RuntimeError as err:
        fields = str(err)
    # time tokens only in the last process's batch (data.time_tokens=official): filled in (all
    # False) on the others, frames padded to the largest bucket: [time_mask shape, its sum] each
    pid, last = jax.process_index(), jax.process_index() == jax.process_count() - 1
    media = {"frame_mask": np.ones((2, 3 + pid), bool)}
    if last:
        media.update(time_ids=np.ones((2, 3 + pid, 8), np.int32), time_mask=np.ones((2, 3 + pid, 8), bool))
    agreed = agree(media, 0, mesh)
    time_fill = multihost_utils.process_allgather(np.asarray(
        [*agreed["time_mask"].shape, agreed["time_mask"].sum(), *agreed["frame_mask"].shape], np.int32))
    # a data error on one process (the last): the others stop at the same point instead of waiting
    # (training: at their batch check; evaluation: at the rows agreement); 1 = stopped, per path
    def broken():
        yield rows_probe
        raise OSError("disk gone")

    rows_probe = synthetic.sft_examples(2, vocab, 16, seed=7)
    pair_probe = local_rows(synthetic.dpo_examples(GLOBAL_BATCH, vocab, length=16, seed=9), mesh)
    if last:   # a pair whose chosen and rejected prompts differ (prefix-shared DPO refuses it)
        pair_probe["chosen_input_ids"][:, 0] += 1
    stopped = []
    for path in ("train", "eval", "pair") if jax.process_count() > 1 else ():
        try:
            if path == "train" and last:   # as run_stage does when next(train_iter) raises
                report_failure(mesh)
                raise OSError("disk gone")
            elif path == "train":
                device_batch(rows_probe, sft)
            elif path == "eval":
                evaluate(sft, state, broken() if last else [rows_probe] * 3)
            else:   # a host-side check that fails on one process only: the others do not go on
                device_batch(pair_probe, dpo)
            stopped.append(0)
        except (DataErrorElsewhere, OSError, ValueError) as err:
            stopped.append(1 if isinstance(err, (OSError, ValueError)) == last else 2)
    data_errors = multihost_utils.process_allgather(np.asarray(stopped or [0, 0], np.int32))
    # evaluation over uneven streams (a val set that does not split evenly): rows A (8) as one
    # global batch, then rows B (2) on batch shard 0 only; one process: [A, B]
    rows = synthetic.sft_examples(10, vocab, 16, seed=300)
    index, count = distributed.batch_shard(mesh)
    part = slice(index * 8 // count, (index + 1) * 8 // count)
    stream = [{k: v[part] for k, v in rows.items()}] + (
        [{k: v[8:] for k, v in rows.items()}] if index == 0 else [])
    eval_loss = evaluate(sft, state, stream)["loss"]

    # per-round reference log-probs (mrDPO): each process its rows, gathered, process 0 writes
    data = synthetic.dpo_examples(REFERENCE_ROWS, vocab, length=16, seed=200)
    order = np.minimum(np.arange(2 * GLOBAL_BATCH), REFERENCE_ROWS - 1)
    start, stop = distributed.process_batch_rows(GLOBAL_BATCH, mesh)   # each process its own rows
    batches = [{k: v[order[i:i + GLOBAL_BATCH]][start:stop] for k, v in data.items()}
               for i in (0, GLOBAL_BATCH)]
    reference = batch_reference(dpo, state, batches, REFERENCE_ROWS, GLOBAL_BATCH)
    save_reference(out / "reference.jsonl", [
        {"index": i, "id": str(i), **dict(zip(REFERENCE_FIELDS, map(float, row), strict=True))}
        for i, row in enumerate(reference)])

    # checkpoint: the engine's Checkpointer, every process writes its own shards
    distributed.ensure_shared_directory(out / "ckpt")
    # a folder per process ("local disks") holding every process's marker from an earlier run
    local = out / f"local_{jax.process_index()}" / ".vsalmonn_hosts"
    local.mkdir(parents=True, exist_ok=True)
    for i in range(jax.process_count()):
        (local / f"process_{i}").write_text("123 an-earlier-run")
    try:
        distributed.ensure_shared_directory(local.parent)
        not_shared = ""
    except RuntimeError as err:
        not_shared = str(err)
    ckpt = Checkpointer(out / "ckpt", keep=2)
    ckpt.save(state, {"stage": "dpo"}, force=True)
    ckpt.close()
    # each process's data-iterator position is its own (its shard of the records): all are kept
    ckpt = Checkpointer(out / "ckpt_data", keep=2, async_save=False)
    ckpt.save(state, {"stage": "dpo", "data": {"process": jax.process_index()}}, force=True)
    own_data = ckpt.restore(state)[1]["data"]["process"]
    # a lagging network file system: the last process does not list the newest step yet; every
    # process restores the step process 0 lists (else they restore different steps)
    ckpt.save(state.replace(step=state.step + 1), {"stage": "dpo"}, force=True)
    if jax.process_count() > 1 and last:
        ckpt.all_steps = lambda: [int(state.step)]
    lagging_step = int(ckpt.restore(state)[0].step)
    ckpt.close()
    # stopping is agreed: only the last process "got SIGTERM", every process learns it
    stop = distributed.any_process(jax.process_index() == jax.process_count() - 1)
    # host-side work of the AV path on every process: a frame resize (it ran on process 0's CPU
    # device, and every other process's decoding raised), and a DPO stage continuing a state whose
    # adapter spans hosts (its reference snapshot was a host copy, which raised)
    resized = resize_bicubic_uint8(np.full((1, 4, 4, 3), 7 * (1 + jax.process_index()), np.uint8),
                                   2, 2)
    adapter, adapter_sharding = continued_adapter(mesh)

    # merged export: W + scale * A @ B, gathered, written once; holds every base weight
    scale = task.lora_config.scale
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        merged = jax.jit(lambda p, lora: merge(p, lora, scale),
                         out_shardings=shardings.params)(state.params, state.trainable["lora"])
    llm_config = task.llm_config
    distributed.export_on_primary(lambda p: save_hf(p, llm_config, out / "export"), merged)

    results = {"losses": np.asarray(losses), "process_count": np.asarray(jax.process_count()),
               "stop": np.asarray(stop), "reference": reference,
               "shards": np.asarray(shards).reshape(jax.process_count(), -1),
               "mismatch": np.asarray(mismatch), "mismatch_raised": np.asarray(raised).ravel(),
               "eval_loss": np.asarray(eval_loss), "fields": np.asarray(fields), "not_shared": np.asarray(not_shared), "data_errors": np.asarray(data_errors).reshape(jax.process_count(), -1), "time_fill": np.asarray(time_fill).reshape(jax.process_count(), -1),
               "padded_loss": np.asarray([same_loss, padded_loss]),
               "resized": np.asarray(multihost_utils.process_allgather(resized)),
               "ref_adapter": distributed.to_host(adapter), "adapter_sharding": adapter_sharding,
               "lagging_step": np.asarray(multihost_utils.process_allgather(np.asarray([lagging_step]))).ravel(),
               "own_data": np.asarray(multihost_utils.process_allgather(np.asarray([own_data]))).ravel()}
    def store(prefix: str, tree) -> None:   # {prefix + key path: host array}, as np.savez keeps it
        for path, leaf in jax.tree_util.tree_flatten_with_path(distributed.to_host(tree))[0]:
            results[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)

    store("", {"trainable": state.trainable, "opt_state": state.opt_state, "merged": merged,
               "params": state.params})
    if restore_from:  # a checkpoint written by another topology, restored here
        restored, meta = Checkpointer(restore_from).restore(state)
        assert meta == {"stage": "dpo"}, meta
        saved_data = Checkpointer(pathlib.Path(restore_from).parent / "ckpt_data").restore(
            state, step=int(state.step))[1]
        results["data_restored"] = np.asarray(saved_data["data"]["process"])
        store("restored", {"trainable": restored.trainable, "opt_state": restored.opt_state,
                           "step": restored.step})
    if export_from:
        store("loaded", load_hf(export_from)[0])
    if distributed.is_primary():
        np.savez(out / "results.npz", **results)
    distributed.barrier("mp_worker_done")


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0])
    restore_from = argv[argv.index("--restore-from") + 1] if "--restore-from" in argv else None
    export_from = argv[argv.index("--export-from") + 1] if "--export-from" in argv else None
    mesh_spec = parse_mesh(argv[argv.index("--mesh") + 1]) if "--mesh" in argv else MESH
    out.mkdir(parents=True, exist_ok=True)
    run(out, restore_from, export_from, mesh_spec)
    print(f"worker {jax.process_index()}/{jax.process_count()} ({SPEC.kind}) done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
