"""Tests for training/losses.py: DPO against hand values and PyTorch, CE, chunked log-probs.

Everything here is tiny and fp32; PyTorch recomputes the same formulas on the same numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vsalmonn_jax.training import losses


def test_dpo_sigmoid_hand_value():
    # h = (-1 - -2) - (-3 - -2) = 2 ; loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    out, rc, rr = losses.dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
                                  jnp.array([-2.0]), beta=0.1)
    assert float(out[0]) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-7)
    assert float(out[0]) == pytest.approx(0.5981388693815918, abs=1e-7)
    assert float(rc[0]) == pytest.approx(0.1, abs=1e-7)
    assert float(rr[0]) == pytest.approx(-0.1, abs=1e-7)


def test_dpo_equals_torch_recomputation(rng):
    pc, pr, rc, rr = (rng.normal(size=16).astype(np.float32) * 20 for _ in range(4))
    for ls in (0.0, 0.2):
        ours, _, _ = losses.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=0.1,
                                     label_smoothing=ls)
        t = [torch.from_numpy(x) for x in (pc, pr, rc, rr)]
        h = (t[0] - t[2]) - (t[1] - t[3])
        ref = (-torch.nn.functional.logsigmoid(0.1 * h) * (1 - ls)
               - torch.nn.functional.logsigmoid(-0.1 * h) * ls)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-6, rtol=1e-6)


def test_dpo_ipo_and_identity_is_log2():
    same = jnp.array([-5.0, -7.0])
    out, rc, rr = losses.dpo_loss(same, same + 1, same, same + 1, beta=0.1)
    np.testing.assert_allclose(np.asarray(out), math.log(2.0), atol=1e-7)
    assert np.all(np.asarray(rc) == 0) and np.all(np.asarray(rr) == 0)
    ipo, _, _ = losses.dpo_loss(jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0]),
                                jnp.array([0.0]), beta=0.1, loss_type="ipo")
    assert float(ipo[0]) == pytest.approx(25.0)  # (0 - 1/(2*0.1))^2
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(same, same, same, same, loss_type="hinge2")


def test_dpo_rewards_carry_no_gradient():
    def f(pc):
        _, rc, _ = losses.dpo_loss(pc, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
        return jnp.sum(rc)

    assert np.all(np.asarray(jax.grad(f)(jnp.ones(2))) == 0)


def test_gt_guided_objective():
    total = losses.gt_guided_dpo(jnp.array([1.0, 3.0]), jnp.array(5.0), 0.1)
    assert float(total) == pytest.approx(2.5)
    assert float(losses.gt_guided_dpo(jnp.array([1.0, 3.0]), None)) == pytest.approx(2.0)
    m = losses.dpo_metrics(jnp.array([1.0, 1.0]), jnp.array([0.2, -0.1]), jnp.array([0.1, 0.0]))
    assert float(m["rewards/accuracy"]) == pytest.approx(0.5)
    assert float(m["rewards/margins"]) == pytest.approx(0.0)
    # rows without a pair (CE-only records, evaluation padding) are left out of the means
    m = losses.dpo_metrics(jnp.array([0.2, 0.6931]), jnp.array([0.3, 0.0]), jnp.array([0.1, 0.0]),
                           has_pair=jnp.array([True, False]))
    assert float(m["rewards/accuracy"]) == 1.0 and float(m["dpo_loss"]) == pytest.approx(0.2)
    assert float(m["rewards/margins"]) == pytest.approx(0.2)


def test_release_step_is_the_mean_of_one_row_steps(rng):
    """dpo.gt_ce_mean=rows: the release trains one row per device (scripts/run.sh TRAIN_BS=1) and
    averages gradients, so the step's loss is the mean of the rows' own losses: a pair row DPO +
    0.1 x its GT token-mean CE, a CE-only row its CE (dpo_trainer.py `ce_only`: weight 1); a
    padding row (no pair, no GT) is left out. Recomputed row by row in PyTorch."""
    dpo = rng.normal(size=4).astype(np.float32) ** 2
    gt_logps = -np.abs(rng.normal(size=(4, 6))).astype(np.float32)
    gt_mask = np.zeros((4, 6), bool)
    gt_mask[0, :2], gt_mask[1, :5], gt_mask[2, 1:4] = True, True, True   # row 3: padding
    has_pair = np.array([True, True, False, False])
    loss, gt_ce = losses.gt_guided_dpo_rows(jnp.asarray(dpo), jnp.asarray(gt_logps),
                                            jnp.asarray(gt_mask), jnp.asarray(has_pair), 0.1)
    rows = []
    for b in range(3):   # each row as its own one-row step
        ce = -torch.from_numpy(gt_logps[b][gt_mask[b]]).mean()   # HF's token-mean CE of the row
        rows.append(dpo[b] + 0.1 * ce if has_pair[b] else ce)
    assert float(loss) == pytest.approx(float(torch.stack([torch.as_tensor(r) for r in rows]).mean()), abs=1e-6)
    assert float(gt_ce) == pytest.approx(float(np.mean([-gt_logps[b][gt_mask[b]].mean() for b in range(3)])),
                                         abs=1e-6)
    pooled = losses.gt_guided_dpo(jnp.asarray(dpo), losses.masked_ce(jnp.asarray(gt_logps), jnp.asarray(gt_mask))[0])
    assert abs(float(pooled) - float(loss)) > 1e-3   # the default (tokens) is another objective


def test_shift_and_masked_ce_equals_torch(rng):
    b, t, v = 3, 11, 37
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    loss_mask = rng.random((b, t)) < 0.6
    targets, mask = losses.shift_targets(jnp.asarray(ids), jnp.asarray(loss_mask))
    assert targets.shape == (b, t) and not bool(mask[:, -1].any())
    np.testing.assert_array_equal(np.asarray(targets[:, :-1]), ids[:, 1:])
    lp = losses.token_logps(jnp.asarray(logits), targets)
    ce, count = losses.masked_ce(lp, mask)
    labels = torch.from_numpy(ids.astype(np.int64)).clone()
    labels[~torch.from_numpy(loss_mask)] = -100
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(ce) == pytest.approx(float(ref), abs=1e-5)
    assert int(count) == int(loss_mask[:, 1:].sum())
    seq = losses.sequence_logps(lp, mask)
    ref_seq = -torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).permute(0, 2, 1), labels[:, 1:], ignore_index=-100,
        reduction="none").sum(-1)
    np.testing.assert_allclose(np.asarray(seq), ref_seq.numpy(), atol=1e-4)


@pytest.mark.parametrize("chunk", [0, 4, 5, 64])
def test_chunked_logps_match_full_with_grads(rng, chunk):
    b, t, h, v = 2, 13, 8, 29
    hidden = jnp.asarray(rng.normal(size=(b, t, h)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(h, v)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)).astype(np.int32))
    mask = np.zeros((b, t), bool)
    mask[:, 9:12] = True  # only the "response" is a target: the first chunks are skipped
    mask = jnp.asarray(mask)

    def full(hd, k):
        return jnp.sum(jnp.where(mask, losses.token_logps(hd @ k, targets), 0.0))

    def chunked(hd, k):
        return jnp.sum(losses.chunked_token_logps(hd, targets, mask, lambda x: x @ k, chunk))

    np.testing.assert_allclose(float(chunked(hidden, kernel)), float(full(hidden, kernel)),
                               rtol=1e-6)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, kernel)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, kernel)
    for a, c in zip(g_full, g_chunk, strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5)
    out = losses.chunked_token_logps(hidden, targets, mask, lambda x: x @ kernel, chunk)
    assert out.shape == (b, t) and np.all(np.asarray(out)[~np.asarray(mask)] == 0)
