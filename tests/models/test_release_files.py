"""Real-weights files as they arrive on disk: shard indexes, stale and truncated files, official
release files holding part of a part, LoRA outside the LLM, `.bin` beside `.safetensors`. Tiny tensors
written here with the `safetensors` package; the official names come from hf_fixtures."""

import io
import json
import pathlib

import numpy as np
import pytest
from hf_fixtures import llava_model, official_state_dict, whisper_model
from safetensors.numpy import save_file

from vsalmonn_jax.config import load_config
from vsalmonn_jax.safetensors_io import CheckpointError, SafetensorsReader

REPO = pathlib.Path(__file__).resolve().parents[2]
P = "module.base_model.model."       # the official file's DeepSpeed + PEFT prefixes


def _index(folder: pathlib.Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _shards(folder: pathlib.Path) -> None:
    save_file({"a": np.ones((4, 4), np.float32)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": np.full((8,), 2.0, np.float32)}, str(folder / "model-00002-of-00002.safetensors"))


def test_an_index_picks_the_files_and_names_what_it_lacks(tmp_path, capsys):
    """Finding 1: the reader merged every *.safetensors and ignored the index: a stale
    model.safetensors beside the shards won silently, a shard never downloaded went unnoticed."""
    _shards(tmp_path)
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    save_file({"a": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))  # stale
    reader = SafetensorsReader(tmp_path)
    assert reader.keys() == ["a", "b"] and float(np.asarray(reader["a"]).sum()) == 16.0
    assert "model.safetensors not in model.safetensors.index.json: ignored" in capsys.readouterr().err
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                      "c": "model-00003-of-00003.safetensors"})
    with pytest.raises(CheckpointError, match=r"index.json names 1 shard.*model-00003-of-00003"
                                              r".safetensors \(a partial download"):
        SafetensorsReader(tmp_path)
    _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                      "d": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: lacks 1 tensor.*'d'"):
        SafetensorsReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()     # no index: a tensor in two files
    with pytest.raises(CheckpointError, match=r"'a' is in both .*model-00001-of-00002.safetensors and "
                                              r".*model.safetensors"):
        SafetensorsReader(tmp_path)


def test_the_whisper_large_v3_download_reads_its_main_file(tmp_path, capsys):
    """openai/whisper-large-v3 with --include "*.safetensors" "*.json" brings model.safetensors AND
    the fp32 variant (model.fp32-0000k-of-00002.safetensors + model.safetensors.index.fp32.json),
    every tensor in both: read the main file, as HF's from_pretrained does without variant=."""
    save_file({"a": np.ones((2,), np.float16), "b": np.ones((3,), np.float16)},
              str(tmp_path / "model.safetensors"))
    save_file({"a": np.full((2,), 7.0, np.float32)}, str(tmp_path / "model.fp32-00001-of-00002.safetensors"))
    save_file({"b": np.full((3,), 7.0, np.float32)}, str(tmp_path / "model.fp32-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.fp32.json").write_text(json.dumps({"weight_map": {
        "a": "model.fp32-00001-of-00002.safetensors", "b": "model.fp32-00002-of-00002.safetensors"}}))
    reader = SafetensorsReader(tmp_path)
    assert reader.keys() == ["a", "b"] and np.asarray(reader["a"]).dtype == np.float16
    assert "variant files model.fp32-00001-of-00002.safetensors, model.fp32-00002-of-00002" \
        ".safetensors ignored" in capsys.readouterr().err
    (tmp_path / "model.safetensors").unlink()              # only the variant: its index's shards
    reader = SafetensorsReader(tmp_path)
    assert float(np.asarray(reader["b"]).sum()) == 21.0
    save_file({"a": np.ones((2,), np.float16)}, str(tmp_path / "model.fp16.safetensors"))
    (tmp_path / "model.fp32-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names 1 shard"):   # the fp32 index, a shard short
        SafetensorsReader(tmp_path)


def test_a_truncated_file_is_named_when_opened(tmp_path, capsys):
    """Finding 2: a truncated shard passed the header read (and check-weights), then failed later
    with numpy's "mmap length is greater than file size"."""
    from vsalmonn_jax.commands import check_weights

    _shards(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00002.safetensors: truncated: "
                                              rf"{len(data) - 4} bytes of {len(data)}"):
        SafetensorsReader(tmp_path)
    shard.write_bytes(data[:12])                              # inside the header
    with pytest.raises(CheckpointError, match=r"truncated: 12 bytes of"):
        SafetensorsReader(shard)
    assert check_weights.main(["--config", str(REPO / "configs/tiny.py"),
                               f"--config.model.pretrained.official={tmp_path}"]) == 1
    assert "model-00002-of-00002.safetensors: truncated" in capsys.readouterr().err


@pytest.fixture(scope="module")
def release():
    """The official file's tensors (numpy) and the tiny config they fit."""
    config = load_config("tiny")
    sd = official_state_dict(config, llava_model(config, seed=2), whisper_model(config, seed=3),
                             rank=int(config.model.lora.rank))
    return config, {k: v.contiguous().numpy() for k, v in sd.items()}


def _plan(config, state, missing=None):
    from vsalmonn_jax.models.import_release import official_plan
    from vsalmonn_jax.models.pretrained import av_config

    return official_plan(state, av_config(config), missing)


# (part, the one marker tensor that decided the part before, one part path it must plan)
MARKERS = [
    ("vision", "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
     ("params", "vision", "layers")),
    ("LLM", "model.embed_tokens.weight", ("params", "llm", "layers")),
    ("Whisper", "speech_encoder.conv1.weight", ("params", "audio", "whisper")),
    ("Whisper", "ln_speech.weight", ("params", "audio", "ln_speech")),
    ("vision connector", "model.mm_projector.0.weight", ("adapter", "vision_connector", "image_newline")),
    ("Q-Former", "speech_Qformer.bert.embeddings.LayerNorm.weight",
     ("adapter", "audio_connector", "qformer")),
]


@pytest.mark.parametrize("part,gone,kept", MARKERS, ids=[m[1] for m in MARKERS])
def test_a_part_is_there_when_any_of_its_tensors_is(release, part, gone, kept):
    """Finding 3: each part was decided by one marker tensor; without it the part's other tensors
    were dropped silently and the part stayed at its random init."""
    config, sd = release
    state = {k: v for k, v in sd.items() if k != P + gone}
    missing = []
    plan = _plan(config, state, missing)
    assert P + gone not in missing and gone in missing, missing     # the normalised name
    node = plan
    for key in kept:
        node = node[key]
    with pytest.raises(KeyError, match=rf"no tensor '{gone}', though it holds the {part} "):
        _plan(config, state)


def test_the_audio_projections_are_a_part_of_their_own(release):
    config, sd = release
    state = {k: v for k, v in sd.items() if "speech_Qformer" not in k}
    plan = _plan(config, state)
    assert "qformer" not in plan["adapter"]["audio_connector"]
    assert {"query", "audio_proj", "final_linear_1"} <= set(plan["adapter"]["audio_connector"])
    state = {k: v for k, v in sd.items() if k != P + "speech_query_tokens"}
    with pytest.raises(KeyError, match="no tensor 'speech_query_tokens', though it holds the audio projections"):
        _plan(config, state)


def _lines(config):
    from vsalmonn_jax.commands.check_weights import check

    class Out(list):
        def write(self, text):
            self.extend(t for t in text.split("\n") if t)

    out = Out()
    return check(config, out=out), out


def _official(tmp_path, config, state):
    save_file(state, str(tmp_path / "all_parameters.safetensors"))
    return load_config("tiny", [f"model.pretrained.official={tmp_path / 'all_parameters.safetensors'}"])


def test_check_weights_names_missing_and_dropped_tensors_of_a_part(release, tmp_path):
    """Finding 3 through check-weights: it said "complete" (the Q-Former fresh, its tensors merely
    "not used"); now the missing marker and an unread tensor of a loaded part are problems, while
    tensors unread by design (SigLIP's tail, the Q-Former's text branch) are not."""
    config, sd = release
    state = {k: v for k, v in sd.items() if k != P + "speech_Qformer.bert.embeddings.LayerNorm.weight"}
    ok, lines = _lines(_official(tmp_path, config, state))
    assert not ok and "missing official: speech_Qformer.bert.embeddings.LayerNorm.weight (Q-Former)" in \
        lines, lines
    extra = P + "speech_Qformer.bert.encoder.layer.7.output_query.dense.bias"   # tiny has 2 layers
    text_branch = P + "speech_Qformer.bert.encoder.layer.0.intermediate.dense.bias"
    state = dict(sd, **{extra: np.zeros(4, np.float32), text_branch: np.zeros(4, np.float32)})
    ok, lines = _lines(_official(tmp_path, config, state))
    problems = [line for line in lines if line.startswith("unused official")]
    assert not ok and len(problems) == 1 and extra in problems[0] and "of the Q-Former" in problems[0]
    assert not any(text_branch in line for line in problems)


def test_a_tied_config_takes_an_equal_head_and_refuses_another(release, tmp_path):
    """Finding 5 through check-weights: a stored lm_head equal to the embedding is a tied model
    saved whole (not a dropped tensor); a different one is an error naming it."""
    from vsalmonn_jax.commands.check_weights import check

    config, sd = release
    state = dict(sd, **{P + "lm_head.weight": sd[P + "model.embed_tokens.weight"].copy()})
    tied = _official(tmp_path, config, state)
    tied.model.llm.tie_word_embeddings = True
    ok, lines = _lines(tied)
    assert ok, lines
    _official(tmp_path, config, sd)
    with pytest.raises(CheckpointError, match=r"stores an output layer '.*lm_head.weight' that differs"):
        check(tied, out=io.StringIO())


def _llm_and_vision_lora(config, kinds=("q_proj", "k_proj", "v_proj")) -> dict:
    llm, rank = config.model.llm, int(config.model.lora.rank)
    sd = {}
    for base in [f"{P}model.layers.{i}.self_attn" for i in range(llm.num_layers)] + \
            [f"{P}model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn"]:
        width = llm.hidden_size if "vision" not in base else config.model.vision.hidden_size
        for kind in kinds:
            sd[f"{base}.{kind}.lora_A.default.weight"] = np.ones((rank, width), np.float32)
            sd[f"{base}.{kind}.lora_B.default.weight"] = np.ones((width, rank), np.float32)
    return sd


def test_lora_is_the_llms_and_lora_elsewhere_is_an_error(release, tmp_path):
    """Finding 4: the LoRA prefix came from iterating a set, so with the vision tower's LoRA beside
    the LLM's it depended on PYTHONHASHSEED, and the other LoRA was dropped silently."""
    from vsalmonn_jax.models.import_release import official_lora_plan, official_view

    config, sd = release
    lora = _llm_and_vision_lora(config)
    _, view = official_view(lora)
    plan = official_lora_plan(view, config.model.llm, missing=[])
    names = plan["llm"]["layers"]["self_attn"]["q_proj"]["a"].names
    assert names == tuple(f"model.layers.{i}.self_attn.q_proj.A" for i in range(config.model.llm.num_layers))
    with pytest.raises(CheckpointError, match=r"6 LoRA tensor\(s\) outside the LLM's 2 layers under "
                                              r"'model.', e.g. .*vision_tower"):
        official_lora_plan(view, config.model.llm)
    ok, lines = _lines(_official(tmp_path, config, dict(sd, **lora)))
    assert not ok and any(line.startswith("unused official: 6 tensor(s) of the LoRA") for line in lines)


def test_the_releases_untrained_siglip_lora_is_left_out_quietly(release, tmp_path, capsys):
    """The release's audio-visual train.py wraps SigLIP's q/k/v in LoRA too (its hasattr(model,
    "vision_tower") misses the tower) and never trains it (B = 0): importing such a checkpoint
    raised, and check-weights failed it; a nonzero B elsewhere still does both."""
    from vsalmonn_jax.models.import_release import official_lora_plan, official_view

    config, sd = release
    lora = _llm_and_vision_lora(config)
    for name in lora:
        if "vision_tower" in name and "lora_B" in name:
            lora[name] = np.zeros_like(lora[name])
    _, view = official_view(lora)
    plan = official_lora_plan(view, config.model.llm)
    assert set(plan["llm"]["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj"}
    assert "have B = 0, adding nothing: not imported" in capsys.readouterr().err
    ok, lines = _lines(_official(tmp_path, config, dict(sd, **lora)))
    assert not any("of the LoRA" in line for line in lines), lines


def test_lora_kernels_are_planned_for_every_layer(release, tmp_path):
    """An adapted kernel found in one layer is planned for all (missing ones named); LoRA the config
    does not target and LoRA covering only some targeted kernels are check-weights problems."""
    from vsalmonn_jax.models.import_release import official_lora_plan, official_view

    config, sd = release
    drop = f"{P}model.layers.0.self_attn.v_proj.lora_B.default.weight"
    missing = []
    official_lora_plan(official_view({k: v for k, v in sd.items() if k != drop})[1], config.model.llm,
                       missing)
    assert missing == ["model.layers.0.self_attn.v_proj.B"]
    extra = {f"{P}model.layers.{i}.self_attn.o_proj.lora_{ab}.default.weight": np.ones((4, 4), np.float32)
             for i in range(config.model.llm.num_layers) for ab in "AB"}
    ok, lines = _lines(_official(tmp_path, config, dict(sd, **extra)))
    assert not ok and any("(LoRA of llm/layers/self_attn/o_proj) is not in model.lora.targets" in line
                          for line in lines), lines
    no_k = {k: v for k, v in sd.items() if "k_proj.lora_" not in k}
    ok, lines = _lines(_official(tmp_path, config, no_k))
    assert not ok and any(line.startswith("partly loaded: LoRA") and "k_proj" in line
                          for line in lines), lines


def test_a_stored_head_is_compared_block_by_block():
    from vsalmonn_jax.models.import_hf import Source, same_tensor

    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = x.copy()
    y[9, 3] = -1.0
    source = Source({"x": x, "x2": x.copy(), "y": y, "t": x.T.copy()})
    assert same_tensor(source, "x", "x2", rows=3)
    assert not same_tensor(source, "x", "y", rows=3) and not same_tensor(source, "x", "t")


def test_bin_files_beside_safetensors_are_named(tmp_path, capsys):
    """Finding 6: a folder with .safetensors ignored its .bin files without a word."""
    import torch

    from vsalmonn_jax.models.import_release import open_official

    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    torch.save({"y": torch.ones(2)}, tmp_path / "all_parameters.bin")
    assert list(open_official(tmp_path).keys()) == ["x"]
    assert "its all_parameters.bin are ignored" in capsys.readouterr().err
