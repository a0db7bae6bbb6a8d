"""Environment feedback -> per-turn returns, advantages, RWR weights and Checker labels.

Pure numpy functions (docs/method.md §4). The rollout engine fills `EpisodeRecord`s; these
functions turn them into the per-turn and per-token arrays that `cmat_loss` consumes. The loss
tests mirror the same formulas, so everything here is written as the plain formula.

Conventions:
- std is the population std (ddof=0) over the rewards of a group's episodes.
- The Checker's positive class is "bad proposal" (a rejection): its job is catching errors, and
  an always-accept Checker then shows recall 0 instead of a flattering accept-recall of 1.
- Undefined ratios (0/0) are reported as None so metrics stay JSON-clean.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from cmat_jax.cmat.config import CMATConfig

Verdict = Literal["accept", "reject"]
DEFAULT_CONFIG = CMATConfig()


@dataclasses.dataclass
class TurnRecord:
    """One Assistant proposal (a turn or a revision inside a turn).

    proposal: the Assistant's generated text (thought + action).
    executed: whether the environment executed it (False: rejected, then revised).
    error: e_t, the environment reported an error executing it; for a rejected proposal the
      engine may fill it from the snapshot execution, else None (no penalty).
    verdict: the Checker's verdict, None when the Checker is off.
    p_accept: the Checker's probability of "accept" from the verdict token.
    revision: this proposal revises an earlier rejected one.
    counterfactual_good: label of a rejected (not executed) proposal, from executing it once on
      a snapshot of the environment; None when not computed.
    checker_reason: the Checker's reason for a rejection.
    observation: what the environment returned (empty when not executed).
    """

    proposal: str
    executed: bool = True
    error: bool | None = False
    verdict: Verdict | None = None
    p_accept: float | None = None
    revision: bool = False
    counterfactual_good: bool | None = None
    checker_reason: str = ""
    observation: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in (None, "accept", "reject"):
            raise ValueError(
                f"TurnRecord.verdict must be 'accept', 'reject' or None, got {self.verdict!r}"
            )
        if self.p_accept is not None and not 0.0 <= self.p_accept <= 1.0:
            raise ValueError(f"TurnRecord.p_accept must be in [0, 1], got {self.p_accept!r}")


@dataclasses.dataclass
class EpisodeRecord:
    """One episode of one task; episodes with the same group_id form a rollout group."""

    task_id: str
    group_id: str
    reward: float
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    task_family: str = "dbbench"

    def __post_init__(self) -> None:
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(
                f"EpisodeRecord.reward must be in [0, 1], got {self.reward!r} (task {self.task_id})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"EpisodeRecord: unknown field(s) {sorted(unknown)}")
        turn_fields = {f.name for f in dataclasses.fields(TurnRecord)}
        turns = []
        for i, turn in enumerate(data.get("turns", [])):
            bad = set(turn) - turn_fields
            if bad:
                raise ValueError(f"EpisodeRecord.turns[{i}]: unknown field(s) {sorted(bad)}")
            turns.append(TurnRecord(**turn))
        return cls(**{**data, "turns": turns})

    @classmethod
    def from_json(cls, text: str) -> EpisodeRecord:
        return cls.from_dict(json.loads(text))


# --- Assistant: returns and advantages ---------------------------------------------------


def turn_returns(episode: EpisodeRecord, cfg: CMATConfig = DEFAULT_CONFIG) -> np.ndarray:
    """r_t = R - alpha*[e_t = error] - beta*[c_t = reject] for every proposal, shape [n_turns]."""
    error = np.array([bool(t.error) for t in episode.turns], dtype=np.float64)
    reject = np.array([t.verdict == "reject" for t in episode.turns], dtype=np.float64)
    return episode.reward - cfg.alpha * error - cfg.beta * reject


def _group_indices(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


class RunningBaseline:
    """EMA of episode rewards: the baseline when a group has one episode (G = 1).

    `A_t = r_t - b` with b the EMA *before* this batch (so an episode never baselines itself).
    No std scaling: with one episode per group there is no group spread to normalise by, and a
    running std over a few early batches is mostly noise. The first batch initialises b with
    its own mean reward. `state_dict`/`load_state_dict` let a resumed run keep its baseline.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"RunningBaseline.decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.value: float | None = None

    def update(self, rewards: Sequence[float] | np.ndarray) -> None:
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.size == 0:
            return
        mean = float(rewards.mean())
        self.value = (
            mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        )

    def baseline(self, rewards: Sequence[float] | np.ndarray) -> float:
        """The current baseline; before any update, the mean of `rewards`."""
        if self.value is not None:
            return self.value
        return float(np.mean(np.asarray(rewards, dtype=np.float64)))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.value = None if state["value"] is None else float(state["value"])


def group_advantages(
    returns: Sequence[np.ndarray],
    rewards: Sequence[float] | np.ndarray,
    group_ids: Sequence[Hashable],
    cfg: CMATConfig = DEFAULT_CONFIG,
    baseline: RunningBaseline | None = None,
) -> list[np.ndarray]:
    """Per-turn advantages, one array per episode.

    Groups with >= 2 episodes: `A_t = (r_t - mean_g(R)) / (max(std_g(R), std_floor) + eps)`.
    Groups with one episode: `A_t = r_t - b` from `baseline` (required then); the baseline is
    updated with all single-episode rewards of this call after they are used.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if not len(returns) == len(rewards) == len(group_ids):
        raise ValueError(
            f"group_advantages: {len(returns)} returns, {len(rewards)} rewards, {len(group_ids)} group ids"
        )
    out: list[np.ndarray] = [np.zeros(0)] * len(returns)
    singles: list[int] = []
    for idx in _group_indices(group_ids).values():
        if len(idx) == 1:
            singles.append(idx[0])
            continue
        r_g = rewards[idx]
        denom = max(float(r_g.std()), cfg.std_floor) + cfg.eps
        mean = float(r_g.mean())
        for i in idx:
            out[i] = (np.asarray(returns[i], dtype=np.float64) - mean) / denom
    if singles:
        if baseline is None:
            raise ValueError(
                "group_advantages: a group has one episode; pass a RunningBaseline (G = 1)"
            )
        b = baseline.baseline(rewards[singles])
        for i in singles:
            out[i] = np.asarray(returns[i], dtype=np.float64) - b
        baseline.update(rewards[singles])
    return out


def episode_advantages(
    episodes: Sequence[EpisodeRecord],
    cfg: CMATConfig = DEFAULT_CONFIG,
    baseline: RunningBaseline | None = None,
) -> list[np.ndarray]:
    """`group_advantages` over EpisodeRecords (returns from `turn_returns`)."""
    return group_advantages(
        [turn_returns(e, cfg) for e in episodes],
        [e.reward for e in episodes],
        [e.group_id for e in episodes],
        cfg,
        baseline,
    )


def rwr_weights(
    rewards: Sequence[float] | np.ndarray, group_ids: Sequence[Hashable], tau: float
) -> np.ndarray:
    """Reward-weighted-regression weights `w_i = softmax_g(R_i / tau) * G`, shape [N].

    Within each group the weights average to 1, so a group whose episodes all scored the same
    reduces to plain SFT on them.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if len(rewards) != len(group_ids):
        raise ValueError(f"rwr_weights: {len(rewards)} rewards, {len(group_ids)} group ids")
    if tau <= 0:
        raise ValueError(f"rwr_weights: tau must be > 0, got {tau!r}")
    w = np.empty_like(rewards)
    for idx in _group_indices(group_ids).values():
        z = rewards[idx] / tau
        e = np.exp(z - z.max())
        w[idx] = e / e.sum() * len(idx)
    return w


# --- Checker: labels, rewards, metrics ---------------------------------------------------


def checker_labels(episode: EpisodeRecord, cfg: CMATConfig = DEFAULT_CONFIG) -> list[bool | None]:
    """Per proposal: True = good, False = bad, None = unknown.

    Executed proposals are good iff they ran without error and the episode succeeded; rejected
    proposals that were not executed take their counterfactual label (None if not computed).
    """
    success = episode.reward >= cfg.success_threshold
    labels: list[bool | None] = []
    for t in episode.turns:
        if t.executed:
            labels.append(not t.error and success)
        else:
            labels.append(t.counterfactual_good)
    return labels


def checker_rewards(episode: EpisodeRecord, cfg: CMATConfig = DEFAULT_CONFIG) -> np.ndarray:
    """+1 when the verdict agrees with the label, -1 when not, 0 without verdict or label."""
    out = np.zeros(len(episode.turns), dtype=np.float64)
    for i, (t, label) in enumerate(zip(episode.turns, checker_labels(episode, cfg), strict=True)):
        if t.verdict is None or label is None:
            continue
        out[i] = 1.0 if (t.verdict == "accept") == label else -1.0
    return out


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def separation_auc(p_good: Sequence[float], p_bad: Sequence[float]) -> float | None:
    """P(a random good proposal's p_accept > a random bad one's), ties counting one half: the
    Checker's ranking quality whatever its threshold (0.5 = no better than chance); None when
    either class is empty."""
    if not len(p_good) or not len(p_bad):
        return None
    g = np.asarray(p_good, np.float64)[:, None]
    b = np.asarray(p_bad, np.float64)[None, :]
    return float(np.mean((g > b) + 0.5 * (g == b)))


def checker_metrics(
    episodes: Sequence[EpisodeRecord], cfg: CMATConfig = DEFAULT_CONFIG
) -> dict[str, float | int | None]:
    """Precision/recall (positive class: bad proposal = reject), accuracy, counts.

    Only proposals with both a verdict and a label count. Also reports the accept-class
    precision (how often an accepted proposal was good) and the mean p_accept on good and bad
    proposals and the AUC of p_accept between them (`separation_auc`).
    """
    tp = fp = fn = tn = 0
    p_good: list[float] = []
    p_bad: list[float] = []
    for ep in episodes:
        for t, label in zip(ep.turns, checker_labels(ep, cfg), strict=True):
            if t.verdict is None or label is None:
                continue
            rejected = t.verdict == "reject"
            bad = not label
            tp += rejected and bad
            fp += rejected and not bad
            fn += (not rejected) and bad
            tn += (not rejected) and not bad
            if t.p_accept is not None:
                (p_bad if bad else p_good).append(t.p_accept)
    n = tp + fp + fn + tn
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "accuracy": _ratio(tp + tn, n),
        "accept_precision": _ratio(tn, tn + fn),
        "reject_rate": _ratio(tp + fp, n),
        "mean_p_accept_good": float(np.mean(p_good)) if p_good else None,
        "mean_p_accept_bad": float(np.mean(p_bad)) if p_bad else None,
        "auc": separation_auc(p_good, p_bad),
        "n": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


# --- per-turn -> per-token -------------------------------------------------------------


def broadcast_to_tokens(
    values: Sequence[float] | np.ndarray,
    spans: Sequence[tuple[int, int]],
    length: int,
    fill: float = 0.0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """A `[length]` array with `values[i]` on tokens `spans[i] = (start, end)` (end exclusive).

    Tokens outside every span get `fill`. Spans must lie in [0, length] and not overlap.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(spans):
        raise ValueError(f"broadcast_to_tokens: {len(values)} values for {len(spans)} spans")
    out = np.full(length, fill, dtype=dtype)
    covered = np.zeros(length, dtype=bool)
    for i, (start, end) in enumerate(spans):
        if not 0 <= start <= end <= length:
            raise ValueError(
                f"broadcast_to_tokens: span {i} = ({start}, {end}) outside [0, {length}]"
            )
        if covered[start:end].any():
            raise ValueError(
                f"broadcast_to_tokens: span {i} = ({start}, {end}) overlaps an earlier span"
            )
        covered[start:end] = True
        out[start:end] = values[i]
    return out
