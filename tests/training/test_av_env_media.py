"""The AV policy env's host memory: decoded clips live in a bounded cache, and training batches
decode their own rows when built (the env held every decoded clip of every round, and featurised a
round's whole record set before its first step: ~55 MB per 110-frame clip, far past a host's memory
for the release's 13k DPO videos)."""

import json

import numpy as np
import pytest
import transformers
from machine import scaled

import vsalmonn_jax.data.example as example_lib
from vsalmonn_jax.config import load_config
from vsalmonn_jax.data.synthetic import build_dataset
from vsalmonn_jax.data.synthetic_scene import default_config
from vsalmonn_jax.training.policy_env import AVPolicyEnv, ListIterator, MediaCache


def test_media_cache_drops_the_least_recent_past_its_budget():
    cache = MediaCache(250)
    for key in "abc":
        cache.put(key, {"pixels": np.zeros(100, np.uint8)})
    assert list(cache.items) == ["b", "c"] and cache.bytes == 200
    assert cache.get("b") is not None and cache.get("a") is None
    cache.put("d", {"pixels": np.zeros(100, np.uint8)})
    assert list(cache.items) == ["b", "d"]                   # c was the least recent
    assert MediaCache(0).put("x", {"pixels": np.zeros(1, np.uint8)}) is not None


def test_a_list_iterator_builds_only_its_rows():
    """A process of a multi-host run collates its own rows of each global batch (not all of them)."""
    built = []

    def collate(rows):
        built.extend(rows)
        return {"x": np.asarray(rows)}

    whole = [next(ListIterator(list(range(8)), collate, 4, seed=3, shuffle=True, repeat=True))["x"]
             for _ in range(1)][0]
    built.clear()
    mine = ListIterator(list(range(8)), collate, 4, seed=3, shuffle=True, repeat=True)
    mine.rows = slice(2, 4)
    np.testing.assert_array_equal(next(mine)["x"], whole[2:4])
    assert built == whole[2:4].tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    scene = default_config()
    scene.update(dict(min_seconds=2, max_seconds=2))
    build_dataset(str(root), n_train=3, n_val=0, n_test=0, cfg=scene)
    items = [json.loads(line) for line in open(root / "train.jsonl")]
    return root, items


def _env(root, budget_gb: float, *overrides) -> AVPolicyEnv:
    config = load_config("tiny", [f"data.tokenizer={root / 'tokenizer'}", "data.max_frames=2",
                                  f"mrdpo.media_cache_gb={budget_gb}", *overrides])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    return AVPolicyEnv(config, None, tokenizer)


class FakeCaptioner:
    """AVCaptioner's host side (prepare = the env's featuriser on a caption record); caption() writes
    "<id>#<row>" and records each batch's rows."""

    def __init__(self, env, batch_size=2, broken=()):
        self.env, self.batch_size, self.broken, self.prepared, self.batches = env, batch_size, broken, [], []

    def prepare(self, item):
        if item["id"] in self.broken:
            raise OSError(f"{item['id']}: gone")
        self.prepared.append(item["id"])
        return self.env.featurizer({**item, "kind": "caption"})

    def caption(self, rows):
        self.batches.append([g for _, g, _ in rows])
        return [{"caption": f"{item['id']}#{g}", "stopped": True, "num_tokens": 1, "logprob": 0.0}
                for item, g, _ in rows]


def _sample(env, items, monkeypatch, **kw):
    import jax

    from vsalmonn_jax.generate.sampling import SamplingConfig

    fake = FakeCaptioner(env, **kw)
    monkeypatch.setattr(env, "_captioner", lambda *a: fake)
    out = env.generate(None, items, sampling=SamplingConfig(), rng=jax.random.PRNGKey(0),
                       max_new_tokens=4)
    return fake, out


def test_sampling_and_batches_decode_each_clip_once_within_budget(clips, monkeypatch):
    root, items = clips
    items = [dict(it, video=str(root / it["video"])) for it in items]
    decoded = []
    features = example_lib.media_features
    monkeypatch.setattr(example_lib, "media_features",
                        lambda video, *a, **k: decoded.append(video) or features(video, *a, **k))
    # k = 2 samples per clip, rows sample-major (as sample_captions repeats them): a clip's two
    # rows are sampled in one batch, in row order of the output, whatever the cache holds
    tight = _env(root, 0.0)
    fake, out = _sample(tight, items * 2, monkeypatch)
    assert [s.text for s in out] == [f"{it['id']}#{g}" for g, it in enumerate(items * 2)]
    assert fake.batches == [[0, 3], [1, 4], [2, 5]] and len(fake.prepared) == 3
    assert tight.prepared.bytes == 0 and len(decoded) == 3
    env = _env(root, 1.0)
    _sample(env, items * 2, monkeypatch)
    assert len(env.prepared.items) == 3 and len(decoded) == 6

    pairs = [{"video": it["video"], "video_id": it["id"], "prompt": "Describe.",
              "chosen": "A red circle appears.", "rejected": "A beep.", "gt": it["caption"]}
             for it in items]
    pairs.append(dict(pairs[0], chosen="A blue square turns."))     # a second pair of clip 0
    cached = dict(env.prepared.items)
    stream = env.batches(pairs, batch_size=2, seed=0, shuffle=False, repeat=False)
    first = next(stream)
    rest = list(stream)
    assert len(decoded) == 6                         # every pair reused its clip's sampled media
    assert env.prepared.items == cached              # batches put nothing in sampling's cache
    again = list(tight.batches(pairs, batch_size=2, seed=0, shuffle=False, repeat=False))
    assert len(decoded) == 6 + 4                     # nothing cached: decoded when batched
    for got, want in zip(again, [first, *rest], strict=True):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # batches decode lazily: nothing before the first batch
    lazy = _env(root, 1.0).batches(pairs, batch_size=2, seed=0, shuffle=False, repeat=False)
    assert len(decoded) == 10 and next(lazy) is not None and len(decoded) == 12


def test_a_decode_failure_on_one_process_stops_every_process(monkeypatch):
    """Sampling decodes its batch's clips on every process, then captions them in collectives: a
    clip one process could not read raised there only, and the others waited in the collective."""
    import jax

    from vsalmonn_jax import distributed
    from vsalmonn_jax.training.host_batches import DataErrorElsewhere, stop_together

    stop_together(None, "decode")                                    # one process, no error
    with pytest.raises(OSError, match="gone"):
        stop_together(OSError("gone"), "decode")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    told = []
    monkeypatch.setattr(distributed, "any_process", lambda flag: told.append(flag) or True)
    with pytest.raises(DataErrorElsewhere, match="another process could not decode"):
        stop_together(None, "decode")                                # the other one failed
    with pytest.raises(OSError, match="gone"):
        stop_together(OSError("gone"), "decode")                     # this one failed
    assert told == [False, True]
    monkeypatch.setattr(distributed, "any_process", lambda flag: flag)
    stop_together(None, "decode")                                    # nobody failed


def test_sampling_stops_every_process_on_a_clip_one_cannot_decode(clips, monkeypatch):
    """AVPolicyEnv.generate agrees on its batch's decoding before captioning it."""
    import jax

    from vsalmonn_jax import distributed
    from vsalmonn_jax.training.host_batches import DataErrorElsewhere

    root, items = clips
    items = [dict(it, video=str(root / it["video"])) for it in items]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "any_process", lambda flag: True)   # another process failed
    fake = None
    with pytest.raises(DataErrorElsewhere):
        fake, _ = _sample(_env(root, 1.0), items, monkeypatch)
    with pytest.raises(OSError, match="gone"):                          # this process failed
        _sample(_env(root, 1.0), items, monkeypatch, broken=(items[1]["id"],))
    monkeypatch.setattr(distributed, "any_process", lambda flag: flag)
    fake, out = _sample(_env(root, 1.0), items, monkeypatch)
    assert len(out) == 3 and len(fake.batches) == 2


def test_sampling_decodes_the_next_batch_while_this_one_is_captioned(clips, monkeypatch):
    """The clips of sampling batch i+1 are prepared (decoded, featurised) during batch i's caption
    call, not after it: at 7B the accelerators otherwise idle through every batch's decode."""
    import time

    root, items = clips
    items = [dict(it, video=str(root / it["video"])) for it in items]

    class Waiting(FakeCaptioner):
        seen = []

        def caption(self, rows):
            end = time.monotonic() + scaled(60.0)
            while len(self.prepared) < len(items) and time.monotonic() < end and not self.batches:
                time.sleep(0.01)   # the first batch waits (bounded) for the next one's decode
            self.seen.append(len(self.prepared))
            return super().caption(rows)

    fake = Waiting(_env(root, 1.0), batch_size=2)
    env = fake.env
    import jax

    from vsalmonn_jax.generate.sampling import SamplingConfig

    monkeypatch.setattr(env, "_captioner", lambda *a: fake)
    out = env.generate(None, items, sampling=SamplingConfig(), rng=jax.random.PRNGKey(0),
                       max_new_tokens=4)
    assert fake.seen == [3, 3]          # batch 2's clip was ready while batch 1 was captioned
    assert [s.text for s in out] == [f"{it['id']}#{g}" for g, it in enumerate(items)]


def test_sampling_prompts_as_the_pairs_and_cached_media_count_toward_max_length(clips, monkeypatch):
    """A training item in the release's conversation form was sampled from its own turns while its
    pairs were prompted by "prompt" / the default; and a pair whose clip was still cached skipped
    the media-aware max_length check that the same pair built from the file gets."""
    root, items = clips
    items = [dict({k: v for k, v in it.items() if k != "prompt"}, video=str(root / it["video"]),
                  conversations=[{"from": "human", "value": "<image>\nWho is there?"},
                                 {"from": "gpt", "value": "x"}]) for it in items]
    env = _env(root, 1.0)
    fake, _ = _sample(env, items, monkeypatch)
    default = env.featurizer.text({"kind": "caption"}, has_media=True)["input_ids"]
    assert env.prepared.items
    for key, example in env.prepared.items.items():
        np.testing.assert_array_equal(example["input_ids"], default, err_msg=key)
    pair = {"video": items[0]["video"], "video_id": items[0]["id"], "prompt": "Describe.",
            "chosen": "A red circle appears. " * 8, "rejected": "A beep.", "gt": "A red circle."}
    text = env.featurizer.text({**pair, "kind": "preference"}, has_media=True)
    longest = max(len(v) for k, v in text.items() if k.endswith("input_ids"))
    tight = _env(root, 1.0, f"data.max_length={longest + 2}")   # the text fits, + media does not
    tight.prepared = env.prepared                                  # the clip is cached
    with pytest.raises(ValueError, match="with its media"):
        next(tight.batches([pair], batch_size=1, seed=0, shuffle=False, repeat=False))
