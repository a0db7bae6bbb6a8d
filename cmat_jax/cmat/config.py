"""Knobs of the CMAT feedback, Checker and memory machinery (docs/method.md §2-4).

One frozen dataclass, validated where it is built, so a bad value fails at the config boundary
with the field's name instead of deep inside a rollout.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class CMATConfig:
    """Feedback, Checker and memory settings.

    alpha, beta: per-turn penalties for an execution error and a Checker rejection
      (`r_t = R - alpha*[error] - beta*[reject]`).
    eps: added to the group std in the advantage denominator.
    std_floor: lower bound on the group std before `eps` is added. The formula as written in
      docs/method.md (`std_floor=0`) divides the per-turn penalties by `eps` when every episode of a
      group has the same reward (all failed, say), giving advantages of order 1e5; the floor
      keeps them at the scale of a group whose rewards differ (0.1 -> an error costs 2).
    tau: RWR temperature in `w_i = softmax_g(R_i / tau) * G`.
    group_size: G, episodes per task in one rollout group.
    baseline_decay: EMA decay of the running baseline used when G == 1.
    success_threshold: an episode succeeds when `R >= success_threshold` (Checker labels).
    max_revisions: K, Assistant revisions allowed after Checker rejections in one round.
    use_checker, use_reflection: the Checker and the Reflector on or off.
    ltm_k: at most this many long-term-memory records are injected into a prompt.
    ltm_token_budget: at most this many tokens of injected long-term-memory text.
    ltm_solutions: also inject how similar tasks were solved (their action summaries), not only
      lessons. Off for small models: a 135M Assistant copies the other task's SQL, table name
      and all (measured: round-2 rollouts of the default job ran `Rowing Crews` queries on
      every table, success 0.000).
    ltm_similar: also inject records of other tasks of the family (BM25-similar), not only the
      same task's reflections. Off for the default job: a 135M Reflector writes the same opening
      thought as its lesson for every failure ("a question I can answer with a SELECT query"),
      and injected into held-out tasks it cut success from 0.312 to 0.125 (measured).
    stm_token_budget: token budget of the Assistant's short-term memory (whole prompt).
    """

    alpha: float = 0.2
    beta: float = 0.1
    eps: float = 1e-6
    std_floor: float = 0.1
    tau: float = 0.5
    group_size: int = 4
    baseline_decay: float = 0.9
    success_threshold: float = 1.0
    max_revisions: int = 2
    use_checker: bool = True
    use_reflection: bool = True
    ltm_k: int = 3
    ltm_token_budget: int = 256
    ltm_solutions: bool = True
    ltm_similar: bool = True
    stm_token_budget: int = 1536

    def __post_init__(self) -> None:
        nonneg = ("alpha", "beta", "eps", "std_floor")
        for name in nonneg:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CMATConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"CMATConfig.tau must be > 0, got {self.tau!r}")
        if self.eps + self.std_floor <= 0:
            raise ValueError("CMATConfig.eps and CMATConfig.std_floor cannot both be 0")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(
                f"CMATConfig.baseline_decay must be in [0, 1), got {self.baseline_decay!r}"
            )
        if not 0.0 < self.success_threshold <= 1.0:
            raise ValueError(
                f"CMATConfig.success_threshold must be in (0, 1], got {self.success_threshold!r}"
            )
        positive_ints = ("group_size", "ltm_token_budget", "stm_token_budget")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"CMATConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_revisions", "ltm_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"CMATConfig.{name} must be >= 0, got {getattr(self, name)!r}")
