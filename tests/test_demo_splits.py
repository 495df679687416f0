"""The demo's splits: validation (where choices are read) and test (scored once per stage) are disjoint
clips, and a run writes val.json beside eval.json for every stage."""

from vsalmonn_jax.data import synthetic
from vsalmonn_jax.demo.data import SPLITS, clip_items, split_sizes


def test_val_and_test_clips_are_disjoint():
    from vsalmonn_jax.commands.demo import demo_config

    config = demo_config(False, None, [])
    sizes = split_sizes(config.demo, int(config.mrdpo.rounds))
    assert sizes["val"] == config.demo.n_val > 0 and set(sizes) == set(SPLITS)
    indices = {s: {synthetic.clip_index(s, i) for i in range(sizes[s])} for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not indices[a] & indices[b], (a, b)
    cfg = synthetic.synthetic_config(config)
    val, test = (clip_items(int(config.demo.seed), s, 60, cfg) for s in ("val", "test"))
    assert not {it["id"] for it in val} & {it["id"] for it in test}
    assert not {it["video"] for it in val} & {it["video"] for it in test}
    same = sum(a["events"] == b["events"] for a in val for b in test)
    assert same < 5   # distinct scenes (a tiny clip can repeat another by chance)
    assert split_sizes(demo_config(False, None, ["--config.demo.n_val=0"]).demo, 3)["val"] == 0
