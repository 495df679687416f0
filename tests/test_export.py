"""`vsalmonn-jax export`: merged LLM in transformers naming at the top of OUT (reloads bit-exactly
through load_hf and gives the LoRA policy's logits in PyTorch), connectors / encoders in OUT/av, the
frozen base from the checkpoint, rebuilt as the run did (--base init, the default) or an HF dir, and
clear errors."""

import json
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "training"))
from toy_tasks import host, mesh_of, tiny_config  # noqa: E402

from vsalmonn_jax.cli import main as cli  # noqa: E402
from vsalmonn_jax.commands.export import export, read_checkpoint, resolve_checkpoint  # noqa: E402
from vsalmonn_jax.lora import merge  # noqa: E402
from vsalmonn_jax.models.qwen2 import load_hf  # noqa: E402
from vsalmonn_jax.safetensors_io import SafetensorsReader  # noqa: E402
from vsalmonn_jax.training import state as st  # noqa: E402
from vsalmonn_jax.training.checkpoint import Checkpointer  # noqa: E402
from vsalmonn_jax.training.task import build_task  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text-task state with non-zero LoRA, checkpointed with and without the frozen base."""
    config = tiny_config("stage=sft")
    task = build_task(config, text_only=True)
    mesh = mesh_of(2)
    tx, _ = st.make_optimizer(config.train, 1)
    state, _ = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)))
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                             host(state.trainable))
    state = state.replace(trainable=jax.device_put(trainable, jax.tree.map(
        lambda x: x.sharding, state.trainable)), step=np.int32(7))
    root = tmp_path_factory.mktemp("ckpt")
    for name, with_params in (("full", True), ("lean", False)):
        ckpt = Checkpointer(root / name / "checkpoints", async_save=False, include_params=with_params)
        ckpt.save(state, {"stage": "sft"}, force=True)
        ckpt.close()
    return config, task, root, host(state.params), trainable


def test_export_merges_lora_and_reloads(trained, tmp_path):
    config, task, root, params, trainable = trained
    code = cli(["export", "--checkpoint", str(root / "full"), "--out", str(tmp_path / "out"),
                "--config", "tiny"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["step"] == 7 and manifest["lora_merged"] and manifest["base"] == "checkpoint"
    assert manifest["lora_scale"] == pytest.approx(2.0)
    want = jax.tree.map(np.asarray, merge(params, trainable["lora"], 2.0))
    got, cfg = load_hf(tmp_path / "out", param_dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
    assert cfg.num_layers == task.llm_config.num_layers

    # transformers reads the export and reproduces the LoRA policy's logits
    import torch
    import transformers

    ids = np.random.default_rng(1).integers(3, 500, size=(2, 12)).astype(np.int32)
    ours, _ = task.model.apply({"params": params, "lora": trainable["lora"]}, ids)
    model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval().float()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_checkpoint_without_base_rebuilds_it(trained, tmp_path):
    config, _, root, params, trainable = trained
    state, _, _ = read_checkpoint(root / "lean")
    with pytest.raises(ValueError, match="--base init"):
        export(state, config, tmp_path / "x", source="lean", base=None)
    code = cli(["export", "--checkpoint", str(root / "lean" / "checkpoints" / "7"), "--out",
                str(tmp_path / "y"), "--config", "tiny", "--dtype", "bfloat16"])
    assert code == 0
    got, _ = load_hf(tmp_path / "y", param_dtype="float32")
    want = jax.tree.map(np.asarray, merge(params, trainable["lora"], 2.0))
    # re-initialised from config.seed = the same base; bf16 export rounds to 8 mantissa bits
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-2, atol=1e-2),
                 got, want)
    assert json.loads((tmp_path / "y" / "export.json").read_text())["dtype"] == "bfloat16"
    reader = SafetensorsReader(tmp_path / "y")
    assert reader["model.embed_tokens.weight"].dtype.name == "bfloat16"


def test_av_layout_writes_connectors_and_encoders(trained, tmp_path):
    config, _, _, params, trainable = trained
    state = {"params": {"llm": params, "vision": {"patch": {"kernel": np.ones((2, 3), np.float32)}}},
             "trainable": {"lora": {"llm": trainable["lora"]},
                           "adapter": {"audio_connector": {"query": np.ones((1, 4), np.float32)}}}}
    manifest = export(state, config, tmp_path, source="mem", step=3)
    assert manifest["files"] == {"llm": "model.safetensors", "config": "av/config.json",
                                 "connectors": "av/connectors.safetensors",
                                 "encoders": "av/encoders.safetensors"}
    assert SafetensorsReader(tmp_path / "av" / "connectors.safetensors").keys() == ["audio_connector.query"]
    assert SafetensorsReader(tmp_path / "av" / "encoders.safetensors").keys() == ["vision.patch.kernel"]
    got, _ = load_hf(tmp_path, param_dtype="float32")
    want = merge(params, trainable["lora"], 2.0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_checkpoint_paths_and_errors(trained, tmp_path, capsys):
    _, _, root, _, _ = trained
    assert resolve_checkpoint(root / "full") == ((root / "full" / "checkpoints").absolute(), None)
    assert resolve_checkpoint(root / "full" / "checkpoints" / "7")[1] == 7
    state, meta, step = read_checkpoint(root / "full")
    assert step == 7 and meta == {"stage": "sft"} and {"params", "trainable"} <= set(state)
    with pytest.raises(FileNotFoundError, match="not an orbax checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint step 9"):
        read_checkpoint(root / "full", 9)
    assert cli(["export", "--checkpoint", str(root / "full"), "--out", str(tmp_path)]) == 1
    assert "no run config.json" in capsys.readouterr().err      # a bare checkpoint needs --config


def test_a_float32_export_merges_a_bf16_base_in_float32():
    """`export --dtype float32` of a bf16 base: the merge cast W + 2AB back to bf16 before the
    upcast, losing most of the LoRA delta's digits (|W| 0.02: bf16 step ~1e-4, delta ~1e-4..1e-3)."""
    import jax.numpy as jnp

    from vsalmonn_jax.commands.export import merged_llm

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.02, (16, 16)), jnp.bfloat16)
    lora = {"q": {"a": rng.normal(0, 0.01, (16, 4)).astype(np.float32),
                  "b": rng.normal(0, 0.01, (4, 16)).astype(np.float32)}}
    exact = np.asarray(w, np.float32) + 2.0 * lora["q"]["a"] @ lora["q"]["b"]
    wide = merged_llm({"q": {"kernel": w}}, lora, 2.0, "float32")["q"]["kernel"]
    assert wide.dtype == np.float32
    np.testing.assert_allclose(wide, exact, rtol=1e-6, atol=1e-8)
    narrow = merged_llm({"q": {"kernel": w}}, lora, 2.0, None)["q"]["kernel"]   # as trained: bf16
    assert np.abs(np.asarray(narrow, np.float32) - exact).max() > 1e-5
