"""The whole AV model on the tiny config: splice / interleave lengths, text rows unchanged, audio-only,
video-only and image inputs, encode-once consistency, and which collections get gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.config import load_config
from vsalmonn_jax.lora import LoraConfig
from vsalmonn_jax.models.av_llm import AVLLM, AVConfig, dummy_batch, init_variables, validate_batch

PH = 7  # placeholder token id


@pytest.fixture(scope="module")
def setup():
    # 3-s "chunks" of 150 encoder frames keep 2 audio tokens per second at a tenth of the cost
    config = load_config("tiny", ["model.audio.max_source_positions=150",
                                  "model.audio.chunk_seconds=3"])
    cfg = AVConfig.from_config(config, placeholder_id=PH)
    lora = LoraConfig.from_config(config.model.lora)
    variables = nn.unbox(init_variables(jax.random.PRNGKey(0), cfg, lora))
    # non-zero LoRA B so the LoRA path matters
    variables["lora"] = jax.tree.map(lambda x: x + 0.01, variables["lora"])
    return cfg, lora, variables


def _batch(cfg, rng):
    """Row 0: 3 frame slots (2 real) + 2 chunk slots (1 real, 3.2 s of audio); row 1: audio-only
    (4.1 s); row 2: text-only. Prompt: [1, 2, PH, 3, 4] + response [10, 11, 12] + padding."""
    b = dummy_batch(cfg, batch=3, frames=3, chunks=2, text_len=10)
    b["pixel_values"] = rng.normal(size=b["pixel_values"].shape).astype(np.float32)
    b["mel"] = rng.normal(size=b["mel"].shape).astype(np.float32)
    b["frame_mask"][0] = [True, True, False]
    b["has_video"][:] = [True, False, False]
    b["has_audio"][:] = [True, True, False]
    b["mel_mask"][:] = [[True, True], [True, True], [False, False]]
    b["audio_seconds"][:] = [3.2, 4.1, 0.0]
    ids = np.array([[1, 2, PH, 3, 4, 10, 11, 12, 0, 0]] * 2 + [[1, 2, 3, 4, 10, 11, 12, 0, 0, 0]])
    b["input_ids"] = ids.astype(np.int32)
    b["attention_mask"] = np.array([[1] * 8 + [0] * 2] * 2 + [[1] * 7 + [0] * 3], bool)
    b["loss_mask"] = np.isin(ids, [10, 11, 12])
    b["example_id"] = np.arange(3)
    return b


def test_lengths_order_and_masks(setup, rng):
    cfg, lora, variables = setup
    assert cfg.frame_tokens == 6  # 56 px / 14 = 4x4 grid -> max pool 2x2 -> 2 rows x (2 + newline)
    assert cfg.audio_tokens_per_second == 2.0 and cfg.audio_tokens_per_chunk == 6
    batch = _batch(cfg, rng)
    validate_batch(batch, PH)
    model = AVLLM(cfg, lora)
    logits, spliced = jax.jit(model.apply)(variables, batch)
    m = cfg.media_length(3, 2)
    assert m == 3 * 6 + 12
    assert logits.shape == (3, 10 + m - 1, cfg.llm.vocab_size)
    # valid lengths: 7 text tokens + media (2 frames * 6 + ceil(3.2 * 2) = 7 audio, both chunks:
    # row 0 has 2 real chunks) / ceil(4.1 * 2) = 9 audio / none
    assert np.asarray(spliced["attention_mask"]).sum(1).tolist() == [7 + 12 + 7, 7 + 9, 7]
    targets = np.asarray(spliced["targets"])
    loss = np.asarray(spliced["loss_mask"])
    assert [targets[r][loss[r]].tolist() for r in range(3)] == [[10, 11, 12]] * 3
    assert targets[0, :2].tolist() == [1, 2] and targets[0, 2 + 19: 2 + 21].tolist() == [3, 4]
    assert np.asarray(spliced["positions"])[0, :26].tolist() == list(range(26))


def test_text_rows_and_media_embeds_are_spliced_exactly(setup, rng):
    cfg, lora, variables = setup
    batch = _batch(cfg, rng)
    model = AVLLM(cfg, lora)
    run = lambda method, *args: jax.jit(functools.partial(model.apply, method=method))(
        variables, *args)
    media = run("encode_frozen", batch)
    embeds, mask = run("connect", media)
    spliced = run("splice", embeds, mask, jnp.asarray(batch["input_ids"]),
                  jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["loss_mask"]))
    n0 = int(mask[0].sum())
    np.testing.assert_array_equal(np.asarray(spliced["inputs_embeds"])[0, 2: 2 + n0],
                                  np.asarray(embeds)[0, :n0])
    # the text-only row gives the same logits as Qwen2 on its ids
    logits = run("decode", spliced)
    text_only = run(lambda mdl, ids, attention_mask: mdl.llm(ids, attention_mask=attention_mask)[0],
                    jnp.asarray(batch["input_ids"][2:]), jnp.asarray(batch["attention_mask"][2:]))
    np.testing.assert_allclose(np.asarray(logits)[2, :7], np.asarray(text_only)[0, :7], atol=1e-5)
    assert int(mask[1].sum()) == 9  # audio-only row


def test_image_is_one_frame_video_and_video_only(setup, rng):
    cfg, lora, variables = setup
    batch = dummy_batch(cfg, batch=1, frames=1, chunks=1, text_len=6)
    del batch["mel"], batch["mel_mask"], batch["audio_seconds"]
    batch["has_audio"][:] = False
    batch["pixel_values"] = rng.normal(size=batch["pixel_values"].shape).astype(np.float32)
    _, spliced = jax.jit(AVLLM(cfg, lora).apply)(variables, batch)
    assert spliced["attention_mask"].shape == (1, 6 + 6 - 1)
    assert int(spliced["attention_mask"].sum()) == 6 - 1 + 6


def test_official_interleave_uses_padding_tokens(setup, rng):
    cfg, lora, variables = setup
    import dataclasses

    official = dataclasses.replace(cfg, interleave="official")
    batch = _batch(cfg, rng)
    _, spliced = jax.jit(AVLLM(official, lora).apply)(variables, batch)
    # row 0: 2 frames, the 12 tokens of its 2 chunks (padding included), front = min(160, 12) = 12
    # (12 % 2 == 0, 6 per frame); row 1 audio-only: all 12 tokens
    assert np.asarray(spliced["attention_mask"]).sum(1).tolist() == [7 + 12 + 12, 7 + 12, 7]


def test_validate_batch_names_the_example(setup, rng):
    cfg, _, _ = setup
    batch = _batch(cfg, rng)
    batch["input_ids"][1, 2] = 3
    batch["example_id"] = np.array([40, 41, 42])
    with pytest.raises(ValueError, match="example_id 41: input_ids has 0 media placeholder"):
        validate_batch(batch, PH)
    batch = _batch(cfg, rng)
    batch["frame_mask"][0] = [True, False, True]
    with pytest.raises(ValueError, match="example_id 0: frame_mask .* is not a prefix"):
        validate_batch(batch, PH)


@pytest.mark.slow
def test_only_adapter_and_lora_train(setup, rng):
    cfg, lora, variables = setup
    batch = _batch(cfg, rng)
    model = AVLLM(cfg, lora)

    def loss(params, adapter, lora_tree):
        logits, spliced = model.apply({"params": params, "adapter": adapter, "lora": lora_tree}, batch)
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = spliced["targets"][:, 1:]
        picked = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        return -jnp.sum(picked * spliced["loss_mask"][:, 1:])

    g_params, g_adapter, g_lora = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        variables["params"], variables["adapter"], variables["lora"])
    norm = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)))
    # the frozen encoders sit behind stop_gradient: exactly zero even when differentiated
    assert norm(g_params["vision"]) == 0.0 and norm(g_params["audio"]) == 0.0
    for name in ("vision_connector", "audio_connector"):
        assert norm(g_adapter[name]) > 0, name
    assert norm(g_adapter["vision_connector"]["image_newline"]) > 0
    assert norm(g_adapter["audio_connector"]["qformer"]) > 0
    assert norm(g_lora) > 0
    # the collections the trainer differentiates are exactly these two
    assert set(variables) == {"params", "adapter", "lora"}
    assert set(variables["adapter"]) == {"vision_connector", "audio_connector"}
    assert set(variables["params"]) == {"vision", "audio", "llm"}


@pytest.mark.slow
def test_bf16_sharded_forward_on_8_devices(rng):
    """bf16 base / fp32 adapter (decision 5) under a (data 2, fsdp 4) mesh with the logical rules."""
    from vsalmonn_jax.training.sharding import logical_rules, make_mesh, sharding_of

    config = load_config("tiny", ["model.audio.max_source_positions=150",
                                  "model.audio.chunk_seconds=3", "model.llm.dtype=bfloat16",
                                  "model.llm.param_dtype=bfloat16"])
    cfg = AVConfig.from_config(config, placeholder_id=PH)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    abstract = jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), cfg))
    shardings = sharding_of(abstract, mesh)
    variables = jax.jit(lambda: nn.unbox(init_variables(jax.random.PRNGKey(0), cfg)),
                        out_shardings=nn.unbox(shardings))()
    assert variables["params"]["llm"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert variables["params"]["vision"]["layers"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["adapter"]))
    batch = _batch(cfg, rng)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # rows 0, 1, 2, 0: batch 4
    with jax.set_mesh(mesh), logical_rules():
        logits, spliced = jax.jit(AVLLM(cfg).apply)(variables, batch)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
    assert np.asarray(spliced["attention_mask"]).sum(1).tolist() == [7 + 12 + 7, 7 + 9, 7, 26]


def test_media_activations_stay_batch_sharded(setup):
    """On a data mesh every device encodes and projects only its own videos (no replicated
    [B, F, patches, H] projector output or [B*C, mel, 3000] Whisper input)."""
    from vsalmonn_jax.training.sharding import logical_rules, make_mesh

    cfg, lora, variables = setup
    mesh = make_mesh({"data": 8})
    batch = dummy_batch(cfg, batch=8, frames=2, chunks=1, text_len=6)
    model = AVLLM(cfg)
    media_keys = ("pixel_values", "mel", "frame_mask", "mel_mask", "has_video", "has_audio", "audio_seconds", "frame_times")
    media_batch = {k: v for k, v in batch.items() if k in media_keys}

    def encode_and_project(v, b):
        media = model.apply(v, b, method="encode_frozen")
        visual = model.apply(v, media["vision"], method=lambda m, x: m.vision_connector(x))
        return media["vision"], media["audio"], visual

    with jax.set_mesh(mesh), logical_rules():
        compiled = jax.jit(encode_and_project).lower(
            {"params": variables["params"], "adapter": variables["adapter"]}, media_batch).compile()
    hlo = compiled.as_text()
    for sharding in compiled.output_shardings:
        assert sharding.shard_shape((8, 1, 1, 1))[0] == 1, sharding  # each device holds 1 of 8 rows
    assert "f32[8,2,16,64]" not in hlo  # no full-batch projector output on any device


def _random_media(cfg, rng, rows: int) -> dict:
    """A dummy batch of `rows` examples (3 frame slots, 1 chunk) with random pixels and mel."""
    batch = dummy_batch(cfg, batch=rows, frames=3, chunks=1, text_len=6)
    batch["pixel_values"] = rng.normal(size=batch["pixel_values"].shape).astype(np.float32)
    batch["mel"] = rng.normal(size=batch["mel"].shape).astype(np.float32)
    return batch


def _runner(model, variables):
    """run(method, *args): a jitted model.apply of that method."""
    return lambda method, *args: jax.jit(functools.partial(model.apply, method=method))(
        variables, *args)


def test_time_tokens_follow_each_frame_of_video_without_audio(setup, rng):
    """The release's --add_time_token: per frame [visual, time-token embeddings, zero vectors up to
    the example's longest time string]; a row whose time_mask is all False (the host's choice for
    a row with audio under data.time_tokens=official) is unchanged."""
    import dataclasses

    cfg, lora, variables = setup
    batch = _random_media(cfg, rng, 2)
    batch["frame_mask"][:] = [True, True, False]
    batch["has_audio"][:] = [False, True]
    batch["mel_mask"][:] = [[False], [True]]
    run = _runner(AVLLM(dataclasses.replace(cfg, interleave="official"), lora), variables)
    media = run("encode_frozen", batch)
    plain, plain_mask = run("connect", media)
    ids = np.zeros((2, 3, 4), np.int32)
    ids[:, 0, :3], ids[:, 1, :4] = [20, 21, 22], [23, 24, 25, 26]
    keep = (ids > 0) & (np.arange(2) == 0)[:, None, None]     # row 1 (with audio): none
    embeds, mask = run("connect", dict(media, time_ids=jnp.asarray(ids), time_mask=jnp.asarray(keep)))
    v = cfg.frame_tokens
    assert embeds.shape[1] == plain.shape[1] + 3 * 4
    assert np.asarray(mask).sum(1).tolist() == [2 * v + 2 * 4, int(plain_mask[1].sum())]
    table = np.asarray(variables["params"]["llm"]["embed_tokens"]["embedding"])
    plain, embeds = np.asarray(plain), np.asarray(embeds)
    expected = np.concatenate([plain[0, :v], table[[20, 21, 22]], np.zeros((1, table.shape[1])),
                               plain[0, v:2 * v], table[[23, 24, 25, 26]]])
    np.testing.assert_allclose(embeds[0, :2 * v + 8], expected, atol=1e-6)
    np.testing.assert_array_equal(embeds[1, :plain.shape[1]], plain[1])   # with audio: unchanged
    assert not embeds[0, 2 * v + 8:].any() and not embeds[1, plain.shape[1]:].any()


def test_time_tokens_sit_between_each_frame_and_its_audio(setup, rng):
    """data.time_tokens=all in the timestamp interleave: per frame [visual, its time tokens padded
    to the longest string, the audio tokens of its second]."""
    cfg, lora, variables = setup
    batch = _random_media(cfg, rng, 1)
    batch["frame_times"] = np.array([[0.0, 1.0, 2.0]], np.float32)
    batch["audio_seconds"] = np.array([3.0], np.float32)   # 2 audio tokens per frame's second
    run = _runner(AVLLM(cfg, lora), variables)
    media = run("encode_frozen", batch)
    plain, plain_mask = run("connect", media)
    ids = np.zeros((1, 3, 4), np.int32)
    ids[0, :, :3] = [[20, 21, 22], [23, 24, 25], [26, 27, 28]]
    ids[0, 2, 3] = 29                                       # frame 2's string is the longest: 4
    embeds, mask = run("connect", dict(media, time_ids=jnp.asarray(ids),
                                       time_mask=jnp.asarray(ids > 0)))
    v, table = cfg.frame_tokens, np.asarray(variables["params"]["llm"]["embed_tokens"]["embedding"])
    plain, embeds = np.asarray(plain)[0], np.asarray(embeds)[0]
    zero = np.zeros((1, table.shape[1]))
    pieces, at = [], 0
    for i in range(3):
        pieces += [plain[at:at + v], table[ids[0, i][ids[0, i] > 0]]]
        pieces += [zero] if i < 2 else []                   # padded to the longest string
        pieces += [plain[at + v:at + v + 2]]                # the 2 audio tokens of second i
        at += v + 2
    expected = np.concatenate(pieces)
    assert int(np.asarray(mask).sum()) == int(plain_mask.sum()) + 3 * 4
    np.testing.assert_allclose(embeds[:len(expected)], expected, atol=1e-6)
    assert not embeds[len(expected):].any()


def test_time_token_plan_of_video_only_is_the_release_layout():
    """Frames back to back (video only): frame i's visual tokens then its n_time slots; slots after
    the valid length point at the zero row."""
    from vsalmonn_jax.models import connectors

    f, v, k, extra = 3, 4, 2, 5              # 3 frame slots, 4 tokens each, 2 slots, 5 more tokens
    m = f * v + extra
    index = jnp.concatenate([jnp.arange(2 * v), jnp.full((m - 2 * v,), f * v + 9)])  # 2 frames
    out, length = connectors.plan_time_tokens(index, jnp.int32(2 * v), f, v, k, jnp.int32(2),
                                              jnp.int32(2))
    media = list(range(v))
    slots = lambda i: [m + i * k, m + i * k + 1]
    expected = media + slots(0) + [x + v for x in media] + slots(1)
    assert int(length) == 2 * v + 4
    assert np.asarray(out)[:int(length)].tolist() == expected
    assert (np.asarray(out)[int(length):] == m + f * k).all()
