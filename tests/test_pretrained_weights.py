"""Released-weight loading end to end (issue 14): tiny LLaVA-OneVision / Whisper / official-release
checkpoints built by transformers here, loaded through config.model.pretrained by the one seam
(models/pretrained.py), checked by `check-weights`, and used by `caption` and `train` through the CLI;
the results are compared with transformers' own models on the same frames and tokens."""

import json
import pathlib
import subprocess
import sys

import fake_devices
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from hf_fixtures import (
    VIDEO_TOKEN,
    llava_dir,
    llava_model,
    official_state_dict,
    whisper_dir,
    whisper_model,
)
from machine import scaled

from vsalmonn_jax.config import load_config
from vsalmonn_jax.data.encode import write_video
from vsalmonn_jax.data.features import siglip_normalize

REPO = pathlib.Path(__file__).resolve().parent.parent
PARITY = ["--config.model.connector.pool_mode=bilinear", "--config.model.connector.newline=video"]
PROMPT = "Please describe the video in detail."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two random LLaVA-OneVision dirs (sharded safetensors + tokenizer), one in the original LLaVA
    layout, a Whisper dir, a video-only clip and an SFT record on it."""
    root = tmp_path_factory.mktemp("weights")
    config = load_config("tiny")
    out = {"root": root, "llava": llava_dir(root / "llava_a", config, seed=0),
           "llava_b": llava_dir(root / "llava_b", config, seed=1),
           "original": llava_dir(root / "llava_orig", config, seed=0, layout="original"),
           "whisper": whisper_dir(root / "whisper", config)}
    rng = np.random.default_rng(0)
    out["video"] = root / "clip.mp4"
    write_video(out["video"], rng.integers(0, 255, (3, 48, 48, 3), dtype=np.uint8), fps=1)
    record = {"id": "clip", "video": str(out["video"]), "conversations": [
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": "A red square moves."}]}
    out["sft"] = root / "sft.jsonl"
    out["sft"].write_text(json.dumps(record) + "\n")
    return out


def _flags(dirs, llava="llava"):
    return [f"--config.model.pretrained.llava={dirs[llava]}",
            f"--config.model.pretrained.whisper={dirs['whisper']}"]


def _cli(*args, devices=1, quiet_s=1200):   # quiet_s: the timeout on a quiet machine
    env = dict(fake_devices.env(devices), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=scaled(quiet_s), cwd=REPO)


def _config(dirs, *extra, llava="llava"):
    return load_config("tiny", [o[len("--config."):] for o in (*_flags(dirs, llava), *extra)])


def test_check_weights_reports_both_layouts(dirs):
    from vsalmonn_jax.commands.check_weights import check

    for llava in ("llava", "original"):
        lines = []
        ok = check(_config(dirs, llava=llava), out=_Lines(lines))
        text = "\n".join(lines)
        assert ok, text
        assert ("transformers Llava" if llava == "llava" else "original LLaVA") in text
        assert "Q-Former           fresh" in text and "LLM                ok" in text
    lines = []
    assert not check(load_config("tiny", [f"model.pretrained.llava={dirs['llava']}"]),
                     out=_Lines(lines))
    assert any("missing: Whisper" in line for line in lines), lines
    bad = load_config("tiny", [f"model.pretrained.llava={dirs['llava']}",
                               f"model.pretrained.whisper={dirs['whisper']}", "model.llm.hidden_size=32"])
    lines = []
    assert not check(bad, out=_Lines(lines))
    assert any(line.startswith("mis-shaped llava:") and "embed_tokens" in line for line in lines), lines


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.extend(t for t in text.split("\n") if t)


def test_seam_streams_onto_the_mesh_in_the_param_dtype(dirs):
    """The seam's arrays equal transformers' tensors (both layouts), sharded on a (2, 2, 2) mesh,
    bf16 kept; the record names paths, layout, counts and the header checksum."""
    from jax.sharding import PartitionSpec as P

    from vsalmonn_jax.models.pretrained import load_pretrained_variables
    from vsalmonn_jax.training import state as st
    from vsalmonn_jax.training.av_task import build
    from vsalmonn_jax.training.sharding import make_mesh

    model = llava_model(load_config("tiny"), seed=0)
    config = _config(dirs, "--config.model.llm.param_dtype=bfloat16", "--config.mesh.data=2",
                     "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    task = build(config, placeholder_id=VIDEO_TOKEN)
    tx, _ = st.make_optimizer(config.train, 1)
    state, shardings, record = st.initial_state(task, config, tx, make_mesh(dict(config.mesh)),
                                                jax.random.PRNGKey(0))
    up = state.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]  # [L, embed, mlp]
    assert up.dtype == jax.numpy.bfloat16 and up.sharding.spec == P(None, "fsdp", "tensor")
    expected = model.model.language_model.layers[1].mlp.up_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(up[1], np.float32),
                                  np.asarray(jax.numpy.asarray(expected, "bfloat16"), np.float32))
    newline = state.trainable["adapter"]["vision_connector"]["image_newline"]
    np.testing.assert_array_equal(np.asarray(newline), model.model.image_newline.detach().numpy())
    original = _config(dirs, llava="original")
    variables, _ = load_pretrained_variables(original, {"params": state.params, **state.trainable})
    np.testing.assert_array_equal(np.asarray(variables["params"]["vision"]["layers"]["fc1"]["kernel"]),
                                  np.asarray(state.params["vision"]["layers"]["fc1"]["kernel"]))
    assert record["base"] == "pretrained" and set(record["sources"]) == {"llava", "whisper"}
    assert record["sources"]["llava"]["layout"].startswith("transformers")
    assert len(record["sources"]["llava"]["checksum"]) == 64
    assert record["fresh_parts"] == ["LoRA", "Q-Former", "audio projections"]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_state_dict_loads_and_checks(dirs, tmp_path, fmt):
    """The release's names (module. + base_model.model., base_layer, PEFT LoRA, LAVIS Q-Former) load
    through model.pretrained.official and check-weights calls it complete; without a tensor: exit 1
    naming it."""
    from vsalmonn_jax.commands.check_weights import check
    from vsalmonn_jax.models import import_hf
    from vsalmonn_jax.models.pretrained import av_config, load_pretrained_variables

    config = load_config("tiny")
    sd = official_state_dict(config, llava_model(config, seed=2), whisper_model(config, seed=3),
                             rank=int(config.model.lora.rank))
    path = tmp_path / f"all_parameters.{fmt}"
    if fmt == "bin":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    official = load_config("tiny", [f"model.pretrained.official={path}"])
    lines = []
    assert check(official, out=_Lines(lines)), "\n".join(lines)
    text = "\n".join(lines)
    for part in ("LLM", "vision", "projector", "image_newline", "Whisper", "Q-Former",
                 "audio projections", "LoRA"):
        assert any(line.startswith(part) and " ok " in line for line in lines), (part, text)
    host = import_hf.load_official(path, av_config(official))
    abstract = jax.eval_shape(lambda: host)
    loaded, record = load_pretrained_variables(official, abstract)
    flat_host, flat_loaded = traverse_util.flatten_dict(host), traverse_util.flatten_dict(loaded)
    assert flat_loaded.keys() == flat_host.keys() and any(k[0] == "lora" for k in flat_host)
    for key, value in flat_host.items():
        np.testing.assert_array_equal(np.asarray(flat_loaded[key]), np.asarray(value), err_msg=str(key))
    assert "official video-SALMONN 2 under module. + base_model.model." in \
        record["sources"]["official"]["layout"]
    if fmt == "bin":  # through the CLI: one tensor removed -> exit 1 naming it
        gone = "module.base_model.model.speech_Qformer.bert.encoder.layer.1.output_query.dense.bias"
        del sd[gone]
        torch.save(sd, path)
        run = _cli("check-weights", "--config", "configs/tiny.py",
                   f"--config.model.pretrained.official={path}", quiet_s=600)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "encoder.layer.1.output_query.dense.bias" in run.stdout and "MISSING" in run.stdout


def _hf_greedy(model, tokenizer, pixels, prompt_ids, tokens_per_video, max_new_tokens):
    """transformers' LlavaOnevision generate on our frames and our prompt (the placeholder expanded
    to the video's token count): (text, summed logprob, token count)."""
    ids = []
    for t in prompt_ids.tolist():
        ids += [VIDEO_TOKEN] * tokens_per_video if t == VIDEO_TOKEN else [t]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             pixel_values_videos=torch.from_numpy(pixels).permute(0, 1, 4, 2, 3),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, len(ids):]
    logps = [torch.log_softmax(step[0].double(), -1)[tok].item() for step, tok in zip(out.logits, new)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), sum(logps), len(new)


@pytest.mark.slow
def test_caption_cli_equals_transformers_generate(dirs, tmp_path):
    """`caption VIDEO --config configs/tiny.py --config.model.pretrained.*` (HF-parity connector:
    bilinear pooling, one newline after the video) writes what transformers' LlavaOnevision generates
    greedily; the same LLaVA dir gives identical captions, another one different captions."""
    from vsalmonn_jax.data.example import Featurizer
    from vsalmonn_jax.data.text import load_tokenizer

    def caption(llava, name):
        out = tmp_path / f"{name}.jsonl"
        run = _cli("caption", dirs["video"], "--config", "configs/tiny.py", *_flags(dirs, llava),
                   *PARITY, "--max-new-tokens", 8, "--batch-size", 1, "--output", out, "--no-progress")
        assert run.returncode == 0, run.stderr
        assert "pretrained: " in run.stderr and "WARNING" not in run.stderr, run.stderr
        return json.loads(out.read_text().splitlines()[0])

    first, again, other = caption("llava", "a"), caption("llava", "a2"), caption("llava_b", "b")
    assert first["caption"] == again["caption"] and first["logprob"] == again["logprob"]
    assert (first["caption"], first["logprob"]) != (other["caption"], other["logprob"])
    config = _config(dirs, *PARITY)
    tokenizer = load_tokenizer(str(dirs["llava"]), "<media>")
    example = Featurizer.from_config(config, str(dirs["llava"]))(
        {"id": "clip", "video": str(dirs["video"]), "kind": "caption"})
    pixels = siglip_normalize(example["pixels"])[None]          # [1, F, S, S, 3] as collate does
    per_frame = (config.model.vision.image_size // config.model.vision.patch_size + 1) // 2
    text, logprob, count = _hf_greedy(llava_model(config, seed=0), tokenizer, pixels,
                                      example["input_ids"], pixels.shape[1] * per_frame ** 2 + 1, 8)
    assert (first["caption"], first["num_tokens"]) == (text, count)
    np.testing.assert_allclose(first["logprob"], logprob, atol=1e-3)


@pytest.mark.slow
def test_train_first_loss_equals_transformers(dirs, tmp_path):
    """`train --config configs/tiny_sft.py --config.model.pretrained.*`: the step-1 loss (before any
    update) is transformers' LlavaOnevision loss on the same frames and tokens, to 1e-4; the run
    records what it loaded in its config.json."""
    from vsalmonn_jax.data.example import Featurizer

    workdir = tmp_path / "run"
    run = _cli("train", "--config", "configs/tiny_sft.py", *_flags(dirs), *PARITY,
               f"--config.data.train={dirs['sft']}", "--config.train.num_steps=1",
               "--config.train.log_every=1", "--workdir", workdir, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    loss = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    saved = json.loads((workdir / "config.json").read_text())
    record = saved["run_records"]["pretrained"]
    assert record["sources"]["llava"]["path"] == str(dirs["llava"].absolute())
    assert saved["data"]["tokenizer"] == str(dirs["llava"]) and not (workdir / "pretrained.json").exists()
    config = _config(dirs, *PARITY)
    example = Featurizer.from_config(config, str(dirs["llava"]))(
        {"id": "clip", "video": str(dirs["video"]), "kind": "sft",
         "conversations": json.loads(dirs["sft"].read_text())["conversations"]})
    per_frame = (config.model.vision.image_size // config.model.vision.patch_size + 1) // 2
    n_video = example["pixels"].shape[0] * per_frame ** 2 + 1
    ids, labels = [], []
    for t, m in zip(example["input_ids"].tolist(), example["loss_mask"].tolist()):
        ids += [VIDEO_TOKEN] * n_video if t == VIDEO_TOKEN else [t]
        labels += [-100] * n_video if t == VIDEO_TOKEN else [t if m else -100]
    pixels = torch.from_numpy(siglip_normalize(example["pixels"])[None]).permute(0, 1, 4, 2, 3)
    with torch.no_grad():
        expected = llava_model(config, seed=0)(
            input_ids=torch.tensor([ids]), pixel_values_videos=pixels,
            labels=torch.tensor([labels])).loss.item()
    np.testing.assert_allclose(loss, expected, atol=1e-4)


def test_tokenizer_defaults_to_the_weights_dirs(dirs, tmp_path):
    """data.tokenizer empty: model.pretrained.tokenizer, else the official dir's, else llava's; a
    tokenizer without the media placeholder (the released Qwen2 one) gets it added."""
    from hf_fixtures import CORPUS

    from vsalmonn_jax.data.text import load_tokenizer
    from vsalmonn_jax.data.tokenizer_build import build_tokenizer
    from vsalmonn_jax.models.pretrained import resolve_tokenizer
    from vsalmonn_jax.training.av_task import placeholder_id_of

    build_tokenizer(CORPUS, str(tmp_path / "official"), vocab_size=300, placeholder="<image>")
    llava = f"model.pretrained.llava={dirs['llava']}"
    config = load_config("tiny", [llava, f"model.pretrained.official={tmp_path / 'official'}"])
    assert resolve_tokenizer(config) == str(tmp_path / "official")
    released = load_tokenizer(str(tmp_path / "official"))
    assert "<media>" not in released.get_vocab()
    assert placeholder_id_of(config) == len(released)  # added after the vocabulary, as the release
    assert resolve_tokenizer(load_config("tiny", [llava])) == str(dirs["llava"])
    explicit = load_config("tiny", [llava, f"model.pretrained.tokenizer={tmp_path / 'official'}"])
    assert resolve_tokenizer(explicit) == str(tmp_path / "official")
    assert resolve_tokenizer(load_config("tiny", [llava, "data.tokenizer=/given"])) == "/given"
    assert resolve_tokenizer(load_config("tiny")) == ""
