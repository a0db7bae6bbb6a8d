"""Feedback math on hand-built episodes; expected values written out by hand."""

import math

import numpy as np
import pytest

from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.feedback import (
    EpisodeRecord,
    RunningBaseline,
    TurnRecord,
    broadcast_to_tokens,
    checker_labels,
    checker_metrics,
    checker_rewards,
    episode_advantages,
    group_advantages,
    rwr_weights,
    separation_auc,
    turn_returns,
)


def group_g1() -> list[EpisodeRecord]:
    """Four episodes of task A: one success, three failures, every turn kind."""
    ep0 = EpisodeRecord(
        "A",
        "g1",
        1.0,
        [
            TurnRecord("p0", executed=True, error=False, verdict="accept", p_accept=0.9),
            # rejected, counterfactually fine -> a false rejection
            TurnRecord(
                "p1",
                executed=False,
                error=None,
                verdict="reject",
                p_accept=0.4,
                counterfactual_good=True,
            ),
            TurnRecord(
                "p2", executed=True, error=True, verdict="accept", p_accept=0.7, revision=True
            ),
        ],
    )
    ep1 = EpisodeRecord(
        "A",
        "g1",
        0.0,
        [
            TurnRecord(
                "q0",
                executed=False,
                error=None,
                verdict="reject",
                p_accept=0.2,
                counterfactual_good=False,
            ),
            TurnRecord(
                "q1", executed=True, error=False, verdict="accept", p_accept=0.6, revision=True
            ),
            # rejected, never executed on a snapshot: no label
            TurnRecord("q2", executed=False, error=None, verdict="reject", p_accept=0.3),
        ],
    )
    ep2 = EpisodeRecord(
        "A",
        "g1",
        0.0,
        # rejected but executed anyway (revisions exhausted), and it errored
        [TurnRecord("s0", executed=True, error=True, verdict="reject", p_accept=0.1)],
    )
    ep3 = EpisodeRecord(
        "A", "g1", 0.0, [TurnRecord("u0", executed=True, error=False)]
    )  # no checker
    return [ep0, ep1, ep2, ep3]


def test_turn_returns_by_hand():
    ep0, ep1, ep2, ep3 = group_g1()
    np.testing.assert_allclose(turn_returns(ep0), [1.0, 0.9, 0.8])
    np.testing.assert_allclose(turn_returns(ep1), [-0.1, 0.0, -0.1])
    np.testing.assert_allclose(turn_returns(ep2), [-0.3])
    np.testing.assert_allclose(turn_returns(ep3), [0.0])
    cfg = CMATConfig(alpha=0.5, beta=0.25)
    np.testing.assert_allclose(turn_returns(ep2, cfg), [-0.75])


def test_group_advantages_by_hand():
    eps = group_g1()
    cfg = CMATConfig(std_floor=0.0, eps=1e-6)
    adv = episode_advantages(eps, cfg)
    mean = 0.25  # rewards 1, 0, 0, 0
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)  # population std = sqrt(0.1875)
    denom = std + 1e-6
    np.testing.assert_allclose(
        adv[0], [(1.0 - mean) / denom, (0.9 - mean) / denom, (0.8 - mean) / denom]
    )
    np.testing.assert_allclose(
        adv[1], [(-0.1 - mean) / denom, (0.0 - mean) / denom, (-0.1 - mean) / denom]
    )
    np.testing.assert_allclose(adv[2], [(-0.3 - mean) / denom])
    np.testing.assert_allclose(adv[3], [(0.0 - mean) / denom])
    # the floor (0.1) is below this group's std, so the default config gives the same numbers
    np.testing.assert_allclose(np.concatenate(episode_advantages(eps)), np.concatenate(adv))


def test_std_floor_when_a_group_has_equal_rewards():
    turns = [TurnRecord("x", error=True), TurnRecord("y")]
    eps = [EpisodeRecord("B", "g", 0.0, turns), EpisodeRecord("B", "g", 0.0, [TurnRecord("z")])]
    adv = episode_advantages(eps, CMATConfig())
    np.testing.assert_allclose(adv[0], [-0.2 / (0.1 + 1e-6), 0.0])
    np.testing.assert_allclose(adv[1], [0.0])
    raw = episode_advantages(eps, CMATConfig(std_floor=0.0))  # the formula as written
    np.testing.assert_allclose(raw[0], [-0.2 / 1e-6, 0.0])


def test_groups_are_separate_and_order_is_kept():
    returns = [np.array([1.0]), np.array([0.5]), np.array([0.0]), np.array([1.0])]
    rewards = [1.0, 0.5, 0.0, 1.0]
    adv = group_advantages(
        returns, rewards, ["a", "b", "a", "b"], CMATConfig(std_floor=0.0, eps=1e-9)
    )
    # group a: rewards 1, 0 -> mean .5 std .5; group b: .5, 1 -> mean .75 std .25
    np.testing.assert_allclose(np.concatenate(adv), [1.0, -1.0, -1.0, 1.0], rtol=1e-7)


def test_running_baseline_for_single_episode_groups():
    baseline = RunningBaseline(decay=0.9)
    cfg = CMATConfig()
    a1 = group_advantages([np.array([1.0, 0.8])], [1.0], ["t1"], cfg, baseline)
    np.testing.assert_allclose(a1[0], [0.0, -0.2])  # first batch: baseline = its own mean (1.0)
    assert baseline.value == pytest.approx(1.0)
    a2 = group_advantages([np.array([0.0])], [0.0], ["t2"], cfg, baseline)
    np.testing.assert_allclose(a2[0], [-1.0])  # used before the update
    assert baseline.value == pytest.approx(0.9)  # 0.9 * 1.0 + 0.1 * 0.0
    restored = RunningBaseline()
    restored.load_state_dict(baseline.state_dict())
    a3 = group_advantages([np.array([0.5, 0.3])], [0.5], ["t3"], cfg, restored)
    np.testing.assert_allclose(a3[0], [0.5 - 0.9, 0.3 - 0.9])
    assert restored.value == pytest.approx(0.9 * 0.9 + 0.1 * 0.5)
    with pytest.raises(ValueError, match="RunningBaseline"):
        group_advantages([np.array([1.0])], [1.0], ["solo"], cfg)


def test_rwr_weights_by_hand():
    w = rwr_weights([1.0, 0.0, 0.0, 0.0, 0.5, 0.5], ["a", "a", "a", "a", "b", "b"], tau=0.5)
    e2 = math.exp(2.0)
    expected = [4 * e2 / (e2 + 3), 4 / (e2 + 3), 4 / (e2 + 3), 4 / (e2 + 3), 1.0, 1.0]
    np.testing.assert_allclose(w, expected)
    assert w[:4].sum() == pytest.approx(4.0)
    # large reward/tau does not overflow
    w_big = rwr_weights([1.0, 0.0], ["g", "g"], tau=1e-3)
    np.testing.assert_allclose(w_big, [2.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="tau"):
        rwr_weights([1.0], ["g"], tau=0.0)


def test_checker_labels_rewards_and_metrics():
    eps = group_g1()
    assert checker_labels(eps[0]) == [True, True, False]
    assert checker_labels(eps[1]) == [False, False, None]
    assert checker_labels(eps[2]) == [False]
    assert checker_labels(eps[3]) == [False]
    np.testing.assert_allclose(checker_rewards(eps[0]), [1.0, -1.0, -1.0])
    np.testing.assert_allclose(checker_rewards(eps[1]), [1.0, -1.0, 0.0])
    np.testing.assert_allclose(checker_rewards(eps[2]), [1.0])
    np.testing.assert_allclose(checker_rewards(eps[3]), [0.0])

    m = checker_metrics(eps)
    # positive class = bad proposal (reject). TP: q0, s0. FP: p1. FN: p2, q1. TN: p0.
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (2, 1, 2, 1, 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["accept_precision"] == pytest.approx(1 / 3)
    assert m["reject_rate"] == pytest.approx(3 / 6)
    assert m["mean_p_accept_good"] == pytest.approx((0.9 + 0.4) / 2)  # p0, p1
    assert m["mean_p_accept_bad"] == pytest.approx((0.7 + 0.2 + 0.6 + 0.1) / 4)  # p2, q0, q1, s0
    # good {0.9, 0.4} over bad {0.7, 0.2, 0.6, 0.1}: 0.9 beats all 4, 0.4 beats 0.2 and 0.1
    assert m["auc"] == pytest.approx(6 / 8)
    assert separation_auc([0.3, 0.8], [0.3]) == pytest.approx((0.5 + 1.0) / 2)  # a tie: half
    assert separation_auc([], [0.1]) is None
    # a lower success threshold makes ep1's executed, error-free q1 good
    m2 = checker_metrics(
        [EpisodeRecord("C", "g", 0.5, [TurnRecord("a", verdict="accept")])],
        CMATConfig(success_threshold=0.5),
    )
    assert (m2["tn"], m2["fn"]) == (1, 0)
    empty = checker_metrics([eps[3]])
    assert empty["n"] == 0 and empty["precision"] is None and empty["recall"] is None


def test_broadcast_to_tokens():
    out = broadcast_to_tokens([1.5, -2.0], [(2, 4), (6, 9)], 10)
    np.testing.assert_array_equal(
        out, np.array([0, 0, 1.5, 1.5, 0, 0, -2, -2, -2, 0], dtype=np.float32)
    )
    assert out.dtype == np.float32
    np.testing.assert_array_equal(broadcast_to_tokens([3.0], [(0, 0)], 2, fill=-1.0), [-1.0, -1.0])
    with pytest.raises(ValueError, match="overlaps"):
        broadcast_to_tokens([1.0, 2.0], [(0, 3), (2, 4)], 5)
    with pytest.raises(ValueError, match="outside"):
        broadcast_to_tokens([1.0], [(3, 6)], 5)
    with pytest.raises(ValueError, match="2 values for 1 spans"):
        broadcast_to_tokens([1.0, 2.0], [(0, 1)], 5)


def test_episode_record_json_roundtrip_and_validation():
    ep = group_g1()[1]
    text = ep.to_json()
    back = EpisodeRecord.from_json(text)
    assert back == ep
    assert isinstance(back.turns[0], TurnRecord)
    with pytest.raises(ValueError, match="reward"):
        EpisodeRecord("A", "g", 1.5)
    with pytest.raises(ValueError, match="verdict"):
        TurnRecord("p", verdict="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"turns\[0\]: unknown field"):
        EpisodeRecord.from_dict(
            {
                "task_id": "A",
                "group_id": "g",
                "reward": 0.0,
                "turns": [{"proposal": "x", "bogus": 1}],
            }
        )


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"CMATConfig\.tau"):
        CMATConfig(tau=0.0)
    with pytest.raises(ValueError, match=r"CMATConfig\.alpha"):
        CMATConfig(alpha=-1.0)
    with pytest.raises(ValueError, match=r"CMATConfig\.group_size"):
        CMATConfig(group_size=0)
    with pytest.raises(ValueError, match=r"CMATConfig\.baseline_decay"):
        CMATConfig(baseline_decay=1.0)
    cfg = CMATConfig()
    assert (cfg.alpha, cfg.beta, cfg.group_size, cfg.max_revisions) == (0.2, 0.1, 4, 2)
