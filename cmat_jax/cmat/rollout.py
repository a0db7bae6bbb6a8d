"""The CMAT rollout engine: many multi-agent episodes at once (docs/method.md §2-4).

Every episode is a small state machine (propose -> verdict -> [reason -> revise] -> env step ...
-> reflect -> done). The engine advances all live episodes together:

1. One `Generator.generate` call for every episode that needs text: Assistant proposals (and
   revisions), Checker rejection reasons and Reflector lessons, each row with its role's adapter
   id — so rows of different roles share one batched call whenever episodes are out of phase
   (a rejected proposal's reason is generated while the other episodes propose).
2. One forward pass for every fresh proposal that the Checker must judge: the logits of the
   verdict token after `CHECKER_PREFIX` give `p_accept` (roles.p_accept) and the full-vocab
   log-probs of both verdict tokens (behaviour log-probs of a Checker training row). Both are
   at the rollouts' sampling temperature, like the Assistant's tokens, so every sampled
   decision of a round comes from the policy tempered by the one τ the loss scores at.
3. Host work: accepted proposals (or rejected ones after K revisions) step the environment;
   rejected ones are executed once on an env snapshot for their counterfactual label.

Assistant prompts are grown at the token level: turn t+1's prompt is turn t's prompt + the
generated tokens (exactly as sampled) + the tokens of the feedback message. So an episode's
whole trajectory is one token row whose generated spans carry their behaviour log-probs exactly,
and it trains as one row (not one row per turn). Only when the prompt outgrows the short-term
memory budget is it rebuilt from `ShortTermMemory.messages()` (old observations shortened, old
turns dropped) and a new row begun.

Output: `EpisodeRecord`s, per-episode env outputs, and `TrainRow`s for `cmat_loss`: tokens,
loss mask on the role's generated tokens, per-token advantage / RWR weight / behaviour log-prob
and the adapter id. Checker rows: the Checker prompt + the verdict token the environment label
asks for (accept for a good proposal, reject for a bad one), masked on that one token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cmat_jax.cmat import feedback as fb
from cmat_jax.cmat import roles as R
from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.memory import LongTermMemory, MemoryRecord, ReadPolicy, ShortTermMemory
from cmat_jax.data.rows import TrainRow
from cmat_jax.envs.base import Env, counterfactual_step
from cmat_jax.faults import fault_point
from cmat_jax.inference.generate import Generator, SamplingParams
from cmat_jax.inference.prefix_cache import PrefixCache

_SENTINEL = "\u2063CMAT-SENTINEL\u2063"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Generation and bookkeeping knobs of the rollout engine (CMAT knobs live in CMATConfig).

    temperature/top_p: Assistant sampling (0 = greedy, used for evaluation); the temperature
      also tempers the Checker's verdict (p_accept = sigmoid((z_accept - z_reject) / τ)).
    max_new_tokens: per generation call (proposals; reasons and lessons are cut after it too).
    reason_max_new_tokens: a Checker reason row's own limit (0 = max_new_tokens). Only the
      reason's first line is used, and a reason that runs on keeps its whole batch decoding.
    checker_sample: draw the verdict from Bernoulli(p_accept) (exploration for the Checker's
      training signal); False: accept iff p_accept >= checker_threshold (evaluation).
    max_context: prompt + new tokens never exceed this (and the model's cache length).
    max_batch: rows per generate / verdict call (more are split into several calls).
    counterfactual: label rejected proposals by executing them on an env snapshot.
    ltm_split: split written to long-term memory ("" = do not write).
    max_generations: safety cap on Assistant generations per episode (revisions included).
    prompt_bucket: prompt lengths are padded to multiples of at least this many tokens, so
      growing prompts reuse a few compiled programs instead of compiling one per length.
    min_batch: generation and verdict calls are padded to at least this many rows (power-of-two
      buckets), so the last few live episodes reuse the programs of the full batch.
    reuse_prefix: keep the last generate calls' KV caches (`PrefixCache`): a prompt reuses the
      keys/values of its longest prefix already computed (its episode's history, or the system
      prompt and task its group shares) and prefills only the rest.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 160
    reason_max_new_tokens: int = 0
    checker_sample: bool = True
    checker_threshold: float = 0.5
    max_context: int = 2048
    max_batch: int = 64
    counterfactual: bool = True
    ltm_split: str = "train"
    max_generations: int = 48
    reflection_chars: int = 400
    prompt_bucket: int = 64
    min_batch: int = 1
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.max_batch < 1 or self.max_generations < 1:
            raise ValueError(
                "RolloutConfig: max_new_tokens, max_batch, max_generations must be >= 1"
            )
        if self.reason_max_new_tokens < 0:
            raise ValueError(
                "RolloutConfig.reason_max_new_tokens must be >= 0 (0 = max_new_tokens), got "
                f"{self.reason_max_new_tokens}"
            )
        if self.max_context <= self.max_new_tokens:
            raise ValueError(
                f"RolloutConfig.max_context ({self.max_context}) must exceed max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not 0.0 <= self.checker_threshold <= 1.0:
            raise ValueError(
                f"RolloutConfig.checker_threshold must be in [0, 1], got {self.checker_threshold}"
            )


@dataclasses.dataclass
class RolloutResult:
    episodes: list[fb.EpisodeRecord]
    outputs: list[dict[str, Any] | None]  # env.output() per episode when the env has one
    rows: list[TrainRow]
    stats: dict[str, Any]
    reflections: list[str]


# ------------------------------------------------------------------------- token-level chat


class ChatTokens:
    """Token ids of chat-template pieces, so a prompt can grow by appending tokens.

    `head(messages)` renders a whole prompt; `feedback(text, eos)` is the tokens that follow an
    Assistant reply (end-of-turn marker unless the reply already ended with EOS, the user message,
    the next generation prompt) — found by rendering a conversation with a sentinel reply and
    keeping what the template writes after it.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        probe = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": _SENTINEL},
            {"role": "user", "content": _SENTINEL + "2"},
        ]
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        a = text.find(_SENTINEL)
        b = text.find(_SENTINEL + "2")
        if a < 0 or b < 0:
            raise ValueError(
                "ChatTokens: the chat template drops message content; cannot grow prompts"
            )
        self._before_user = text[a + len(_SENTINEL) : b]
        self._after_user = text[b + len(_SENTINEL) + 1 :]
        self._eos_texts = {tokenizer.decode([e]) for e in tokenizer.eos_ids}
        # The end-of-turn id: the EOS whose text opens what the template writes after a turn.
        ends = [
            e
            for e in sorted(tokenizer.eos_ids)
            if self._before_user.startswith(tokenizer.decode([e]) or "\0")
        ]
        self.turn_end_id: int | None = ends[0] if ends else None

    def head(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return list(
            self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        )

    def feedback(self, text: str, ended_with_eos: bool) -> list[int]:
        before = self._before_user
        if ended_with_eos:
            for e in self._eos_texts:
                if e and before.startswith(e):
                    before = before[len(e) :]
                    break
        return self.tok.encode(before + text + self._after_user, add_bos=False)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_bos=False))


def checker_prompt_ids(
    tokenizer: Any,
    role: R.Role,
    task_text: str,
    history: Sequence[dict[str, str]],
    proposal: str,
    limit: int,
) -> list[int]:
    """The Checker's prompt ids (ending in the verdict prefix) within `limit` tokens: the
    oldest steps are left out first, so the instructions and the task are always read."""
    return R.fit_history(
        lambda h: tokenizer.encode(
            R.checker_prompt_text(tokenizer, R.checker_messages(role, task_text, h, proposal)),
            add_bos=False,
        ),
        history,
        limit,
    )


# ------------------------------------------------------------------------- episode state


@dataclasses.dataclass
class _Chain:
    """A growing token row: the prompt so far and the spans the Assistant generated."""

    ids: list[int]
    logp: list[float]
    spans: list[tuple[int, int, int]]  # (start, end, turn index)


@dataclasses.dataclass
class _CheckerCall:
    prompt: list[int]
    logp2: np.ndarray  # full-vocab log-probs of (accept, reject)
    turn: int


@dataclasses.dataclass
class _Pending:
    text: str
    tokens: list[int]
    logp: np.ndarray
    eos: bool


class _Episode:
    def __init__(self, index: int, task: Any, group_id: str, env: Env):
        self.index = index
        self.task = task
        self.group_id = group_id
        self.env = env
        self.phase = "propose"
        self.task_id = ""
        self.task_text = ""
        self.snippets: list[str] = []
        self.stm: ShortTermMemory | None = None
        self.chains: list[_Chain] = []
        self.turns: list[fb.TurnRecord] = []
        self.checks: list[_CheckerCall] = []
        self.pending: _Pending | None = None
        self.checker_prompt: list[int] = []
        self.revisions = 0  # revisions used in the current env round
        self.generations = 0
        self.reward = 0.0
        self.output: dict[str, Any] | None = None
        self.reflection = ""
        self.last_feedback = ""
        self.pending_cf_unknown: list[int] = []  # rejected turns labelled at episode end

    @property
    def chain(self) -> _Chain:
        return self.chains[-1]


def task_identity(task: Any, first_messages: Sequence[dict[str, str]]) -> tuple[str, str]:
    """(task_id, task_text): the task's `task_id` attribute (else its text) and the last user
    message of the env's reset messages (the task; example turns come before it)."""
    text = next((m["content"] for m in reversed(first_messages) if m.get("role") == "user"), "")
    tid = getattr(task, "task_id", None)
    return (str(tid) if tid is not None else text[:200]), text


# ------------------------------------------------------------------------- the engine


class RolloutEngine:
    """Runs batches of CMAT episodes on one model with LoRA slots for the roles.

    `make_env()` builds a fresh env per episode. `ltm` (optional) is read at episode start with
    `read_policy` and written at episode end (split `rollout_cfg.ltm_split`, "" = no writes).
    `mesh`: generate on it (batch rows over data x fsdp, KV cache and LoRA slots sharded by the
    params' logical axes; the model's arrays should already live on it).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        make_env: Callable[[], Env],
        *,
        roles: R.RoleSet,
        cmat_cfg: CMATConfig | None = None,
        rollout_cfg: RolloutConfig | None = None,
        ltm: LongTermMemory | None = None,
        read_policy: ReadPolicy | None = None,
        baseline: fb.RunningBaseline | None = None,
        mesh: Any = None,
    ):
        self.model = model
        self.tok = tokenizer
        self.make_env = make_env
        self.roles = roles
        self.cfg = cmat_cfg = cmat_cfg or CMATConfig()
        self.rcfg = rollout_cfg = rollout_cfg or RolloutConfig()
        self.ltm = ltm
        self.read_policy = read_policy or ReadPolicy.training()
        self.baseline = (
            baseline if baseline is not None else fb.RunningBaseline(cmat_cfg.baseline_decay)
        )
        self.chat = ChatTokens(tokenizer)
        max_len = min(rollout_cfg.max_context, model.config.max_position_embeddings)
        self.gen = Generator(
            model,
            tokenizer,
            max_cache_len=max_len,
            min_prompt_bucket=rollout_cfg.prompt_bucket,
            min_batch=rollout_cfg.min_batch,
            mesh=mesh,
        )
        self.max_len = max_len
        lora = model.lora
        slots = {"none": -1}
        if lora is not None:
            slots.update({s: i for i, s in enumerate(lora.config.slots)})
        self.slots = slots
        self.slot = {
            name: R.slot_index(roles, slots, name) for name in ("assistant", "checker", "reflector")
        }
        self.verdict_ids = R.verdict_token_ids(tokenizer) if cmat_cfg.use_checker else (0, 0)
        self.reject_prefix = tokenizer.encode(R.REJECT_WORD + ":", add_bos=False)
        self._prefix: PrefixCache | None = None  # per run()

    # -------------------------------------------------------------- public

    def run(
        self,
        tasks: Sequence[Any],
        *,
        group_size: int | None = None,
        key: jax.Array | None = None,
        train: bool = True,
    ) -> RolloutResult:
        """Run `group_size` episodes per task (default cfg.group_size) to the end, all at once.

        `train=False` skips advantages and training rows (evaluation).
        """
        G = self.cfg.group_size if group_size is None else group_size
        if G < 1 or not len(tasks):
            raise ValueError(
                f"rollout: need tasks and group_size >= 1 (got {len(tasks)} tasks, G={G})"
            )
        key = jax.random.key(0) if key is None else key
        t0 = time.perf_counter()
        stats: dict[str, Any] = dict(
            generate_calls=0,
            mixed_calls=0,
            generated_tokens=0,
            verdict_calls=0,
            env_steps=0,
            counterfactual_steps=0,
            reused_prompt_tokens=0,
            prefilled_prompt_tokens=0,
        )
        eps: list[_Episode] = []
        for t_i, task in enumerate(tasks):
            for _ in range(G):
                ep = _Episode(len(eps), task, f"g{t_i}", self.make_env())
                self._start(ep)
                eps.append(ep)
        # A step is a generate and a verdict phase, each split into calls of max_batch rows:
        # keep the caches of the last two steps' calls.
        calls = -(-len(eps) // self.rcfg.max_batch)
        self._prefix = PrefixCache(max_calls=4 * calls) if self.rcfg.reuse_prefix else None
        try:
            step = 0
            while any(e.phase != "done" for e in eps):
                key, k_gen = jax.random.split(key)
                self._generate_phase(eps, k_gen, stats)
                key, k_ver = jax.random.split(key)
                self._verdict_phase(eps, k_ver, stats)
                step += 1
                fault_point("rollout_step")
        finally:
            for e in eps:
                e.env.close()
            self._prefix = None  # the weights change before the next run
        records = [self._record(e) for e in eps]
        rows: list[TrainRow] = []
        if train:
            rows = self._rows(eps, records)
        stats["wall_s"] = time.perf_counter() - t0
        stats.update(summarize(records, self.cfg))
        # Does injected long-term memory help? Success with and without lessons in the prompt.
        ok = [e.reward >= self.cfg.success_threshold for e in eps]
        with_mem = [o for o, e in zip(ok, eps, strict=True) if e.snippets]
        without = [o for o, e in zip(ok, eps, strict=True) if not e.snippets]
        stats["episodes_with_memory"] = len(with_mem)
        stats["success_with_memory"] = float(np.mean(with_mem)) if with_mem else None
        stats["success_without_memory"] = float(np.mean(without)) if without else None
        stats["context_rebuilds"] = sum(len(e.chains) - 1 for e in eps)
        return RolloutResult(
            records, [e.output for e in eps], rows, stats, [e.reflection for e in eps]
        )

    # -------------------------------------------------------------- episode start

    def _start(self, ep: _Episode) -> None:
        first = ep.env.reset(ep.task)
        ep.task_id, ep.task_text = task_identity(ep.task, first)
        if self.ltm is not None and self.cfg.ltm_k > 0:
            got = self.ltm.retrieve(
                ep.env.family,
                ep.task_id,
                ep.task_text,
                k=self.cfg.ltm_k,
                token_budget=self.cfg.ltm_token_budget,
                count_tokens=self.chat.count,
                policy=self.read_policy,
                solutions=self.cfg.ltm_solutions,
                similar=self.cfg.ltm_similar,
            )
            ep.snippets = [r.snippet for r in got]
        head = R.assistant_head(self.roles.assistant, first, ep.snippets)
        budget = min(self.cfg.stm_token_budget, self.max_len - self.rcfg.max_new_tokens)
        ep.stm = ShortTermMemory(head, self.chat.count, budget)
        ep.chains.append(_Chain(self.chat.head(head), [], []))

    # -------------------------------------------------------------- generation phase

    def _requests(self, ep: _Episode) -> tuple[list[int], str] | None:
        if ep.phase == "propose":
            budget = self.max_len - self.rcfg.max_new_tokens
            limit = min(budget, self.cfg.stm_token_budget)
            if len(ep.chain.ids) > limit:
                ids = self.chat.head(ep.stm.messages())  # rebuilt from fitted STM: a new row
                # STM counts message text (+ a per-message allowance); the rendered prompt can
                # come out longer. Tighten its budget by the overshoot until it fits or nothing
                # more can go.
                while len(ids) > limit and ep.stm.budget_tokens > 1:
                    ep.stm.budget_tokens = max(1, ep.stm.budget_tokens - (len(ids) - limit))
                    tighter = self.chat.head(ep.stm.messages())
                    if len(tighter) >= len(ids):
                        break
                    ids = tighter
                if len(ids) > budget:
                    self._end_context(ep)
                    return None
                ep.chains.append(_Chain(ids, [], []))
            return ep.chain.ids, "assistant"
        if ep.phase == "reason":
            # The verdict prompt was fitted with room for this prefix and the reason.
            return ep.checker_prompt + self.reject_prefix, "checker"
        if ep.phase == "reflect":
            ids = R.fit_history(
                lambda h: self.chat.head(
                    R.reflector_messages(
                        self.roles.reflector, ep.task_text, h, ep.reward, ep.last_feedback
                    )
                ),
                ep.stm.turn_messages(),
                self.max_len - self.rcfg.max_new_tokens,
            )
            return ids, "reflector"
        return None

    def _generate(self, prompts: list[list[int]], stats: dict, **kw: Any) -> Any:
        """`Generator.generate` through the run's prefix cache, counting prompt tokens."""
        pc = self._prefix
        reused, prefilled = (0, 0) if pc is None else (pc.reused_tokens, pc.prefilled_tokens)
        out = self.gen.generate(prompts, prefix_cache=pc, **kw)
        if pc is None:
            stats["prefilled_prompt_tokens"] += sum(len(p) for p in prompts)
        else:
            stats["reused_prompt_tokens"] += pc.reused_tokens - reused
            stats["prefilled_prompt_tokens"] += pc.prefilled_tokens - prefilled
        return out

    def _generate_phase(self, eps: list[_Episode], key: jax.Array, stats: dict) -> None:
        reqs: list[tuple[_Episode, list[int], str]] = []
        for ep in eps:
            r = self._requests(ep)
            if r is not None:
                reqs.append((ep, *r))
        greedy = SamplingParams()
        samp = SamplingParams(temperature=self.rcfg.temperature, top_p=self.rcfg.top_p)
        full = self.rcfg.max_new_tokens
        reason = min(full, self.rcfg.reason_max_new_tokens or full)
        for lo in range(0, len(reqs), self.rcfg.max_batch):
            part = reqs[lo : lo + self.rcfg.max_batch]
            key, sub = jax.random.split(key)
            out = self._generate(
                [p for _, p, _ in part],
                stats,
                max_new_tokens=[reason if role == "checker" else full for _, _, role in part],
                sampling=[samp if role == "assistant" else greedy for _, _, role in part],
                adapter_ids=[self.slot[role] for _, _, role in part],
                key=sub,
            )
            stats["generate_calls"] += 1
            kinds = {self.slot[role] for _, _, role in part}
            roles_in = {role for _, _, role in part}
            stats["mixed_calls"] += int(len(roles_in) > 1 and len(kinds) > 1)
            stats["generated_tokens"] += int(out.lengths.sum())
            for i, (ep, _, role) in enumerate(part):
                text = out.texts[i]
                if role == "assistant":
                    ep.generations += 1
                    ep.pending = _Pending(
                        text, out.tokens[i], out.logprobs[i], out.finish_reasons[i] == "eos"
                    )
                    if self.cfg.use_checker:
                        ep.phase = "verdict"
                    else:
                        self._execute(ep, verdict=None, p_acc=None, stats=stats)
                elif role == "checker":
                    self._revise(ep, R.parse_verdict(R.REJECT_WORD + ":" + text).reason)
                else:
                    self._store(ep, R.clean_reflection(text, self.rcfg.reflection_chars))

    # -------------------------------------------------------------- verdict phase

    def _verdict_phase(self, eps: list[_Episode], key: jax.Array, stats: dict) -> None:
        todo = [e for e in eps if e.phase == "verdict"]
        if not todo:
            return
        limit = self.max_len - self.rcfg.max_new_tokens - len(self.reject_prefix)
        prompts = []
        for ep in todo:
            prompts.append(
                checker_prompt_ids(
                    self.tok,
                    self.roles.checker,
                    ep.task_text,
                    ep.stm.turn_messages(),
                    ep.pending.text,
                    limit,
                )
            )
        # The verdict is the next token after the prompt: a prefill's log-probs of the two
        # verdict words. Through the generator, the prompts' keys/values land in the prefix
        # cache, so a rejection's reason row (this prompt + "reject:") prefills only its tail.
        # Scored at the sampling temperature (1 when greedy): the one token this call samples
        # is never used.
        tempered = SamplingParams(temperature=self.rcfg.temperature)
        logp = []
        for lo in range(0, len(prompts), self.rcfg.max_batch):
            part = prompts[lo : lo + self.rcfg.max_batch]
            out = self._generate(
                part,
                stats,
                max_new_tokens=1,
                adapter_ids=[self.slot["checker"]] * len(part),
                score_ids=self.verdict_ids,
                sampling=[tempered] * len(part),
                eos_ids=[],
            )
            logp.append(out.scores)
            stats["verdict_calls"] += 1
        logp = np.concatenate(logp)
        p_acc = R.p_accept(logp, (0, 1))  # columns: the accept and reject words
        if self.rcfg.checker_sample:
            u = np.asarray(jax.random.uniform(key, (len(todo),)))
            accept = u < p_acc
        else:
            accept = p_acc >= self.rcfg.checker_threshold
        for ep, ids, lp, p, acc in zip(todo, prompts, logp, p_acc, accept, strict=True):
            turn = len(ep.turns)
            ep.checks.append(_CheckerCall(ids, lp, turn))
            if acc:
                self._execute(ep, verdict="accept", p_acc=float(p), stats=stats)
            elif ep.revisions >= self.cfg.max_revisions:  # out of revisions: it runs anyway
                self._execute(ep, verdict="reject", p_acc=float(p), stats=stats)
            else:
                self._reject(ep, float(p), stats)
                ep.checker_prompt = ids

    # -------------------------------------------------------------- transitions

    def _append_generated(self, ep: _Episode, turn: int) -> None:
        """Put the pending proposal's tokens (turn `turn`) on the chain."""
        pend = ep.pending
        ch = ep.chain
        start = len(ch.ids)
        ch.ids.extend(pend.tokens)
        ch.logp.extend([0.0] * (start - len(ch.logp)))
        ch.logp.extend(float(x) for x in pend.logp)
        ch.spans.append((start, len(ch.ids), turn))

    def _append_feedback(self, ep: _Episode, text: str) -> None:
        ep.chain.ids.extend(self.chat.feedback(text, ep.pending.eos))

    def _execute(self, ep: _Episode, verdict: str | None, p_acc: float | None, stats: dict) -> None:
        pend = ep.pending
        self._append_generated(ep, len(ep.turns))
        res = ep.env.step(pend.text)
        stats["env_steps"] += 1
        error = bool(res.info.get("error", False))
        ep.turns.append(
            fb.TurnRecord(
                proposal=pend.text,
                executed=True,
                error=error,
                verdict=verdict,
                p_accept=p_acc,
                revision=ep.revisions > 0,
                observation=res.observation,
            )
        )
        ep.revisions = 0
        ep.last_feedback = res.observation or str(res.info.get("status", ""))
        if res.done:
            self._finish(ep, res.reward)
            return
        ep.stm.add_step(pend.text, res.observation)
        self._append_feedback(ep, res.observation)
        ep.pending = None
        ep.phase = "propose"
        if ep.generations >= self.rcfg.max_generations:
            self._end_context(ep)

    def _reject(self, ep: _Episode, p_acc: float, stats: dict) -> None:
        pend = ep.pending
        error: bool | None = None
        good: bool | None = None
        if self.rcfg.counterfactual:
            res = counterfactual_step(ep.env, pend.text)
            stats["counterfactual_steps"] += 1
            error = bool(res.info.get("error", False))
            if error:
                good = False
            elif res.done:
                good = res.reward >= self.cfg.success_threshold
        ep.turns.append(
            fb.TurnRecord(
                proposal=pend.text,
                executed=False,
                error=error,
                verdict="reject",
                p_accept=p_acc,
                revision=ep.revisions > 0,
                counterfactual_good=good,
            )
        )
        if self.rcfg.counterfactual and good is None:
            ep.pending_cf_unknown.append(len(ep.turns) - 1)
        ep.phase = "reason"

    def _revise(self, ep: _Episode, reason: str) -> None:
        turn = ep.turns[-1]
        turn.checker_reason = reason
        message = R.rejection_feedback(reason)
        self._append_generated(ep, len(ep.turns) - 1)
        ep.stm.add_rejection(turn.proposal, message)
        self._append_feedback(ep, message)
        ep.pending = None
        ep.revisions += 1
        ep.phase = "propose"
        if ep.generations >= self.rcfg.max_generations:
            self._end_context(ep)

    def _end_context(self, ep: _Episode) -> None:
        """The episode cannot go on (context or generation cap): end it with the env's scorer."""
        finish = getattr(ep.env, "finish", None)
        reward = 0.0
        if callable(finish):
            reward = finish().reward
        ep.last_feedback = "ran out of context"
        self._finish(ep, reward)

    def _finish(self, ep: _Episode, reward: float) -> None:
        ep.reward = float(reward)
        ep.pending = None
        out = getattr(ep.env, "output", None)
        ep.output = out() if callable(out) else None
        success = ep.reward >= self.cfg.success_threshold
        for i in ep.pending_cf_unknown:  # executed-proposal rule: no error and episode success
            ep.turns[i].counterfactual_good = success
        if self.cfg.use_reflection and ep.reward < 1.0:
            ep.phase = "reflect"
        else:
            self._store(ep, "")

    def _store(self, ep: _Episode, reflection: str) -> None:
        ep.reflection = reflection
        ep.phase = "done"
        if self.ltm is not None and self.rcfg.ltm_split:
            self.ltm.add(
                MemoryRecord(
                    task_family=ep.env.family,
                    task_id=ep.task_id,
                    task_text=ep.task_text,
                    trajectory_summary=ep.stm.summary(),
                    reflection=reflection,
                    reward=ep.reward,
                    split=self.rcfg.ltm_split,
                )
            )

    # -------------------------------------------------------------- records and rows

    def _record(self, ep: _Episode) -> fb.EpisodeRecord:
        return fb.EpisodeRecord(
            task_id=ep.task_id,
            group_id=ep.group_id,
            reward=ep.reward,
            turns=ep.turns,
            task_family=ep.env.family,
        )

    def _rows(self, eps: list[_Episode], records: list[fb.EpisodeRecord]) -> list[TrainRow]:
        advantages = fb.episode_advantages(records, self.cfg, self.baseline)
        weights = fb.rwr_weights(
            [r.reward for r in records], [r.group_id for r in records], self.cfg.tau
        )
        rows: list[TrainRow] = []
        for ep, rec, adv, w in zip(eps, records, advantages, weights, strict=True):
            for ch in ep.chains:
                if not ch.spans:
                    continue
                n = ch.spans[-1][1]  # the row ends with its last proposal, not the feedback
                spans = [(s, e) for s, e, _ in ch.spans]
                turn_adv = [adv[t] for _, _, t in ch.spans]
                mask = fb.broadcast_to_tokens(np.ones(len(spans)), spans, n)
                logp = np.zeros(n, np.float32)
                logp[: min(n, len(ch.logp))] = ch.logp[:n]
                rows.append(
                    TrainRow(
                        tokens=np.asarray(ch.ids[:n], np.int32),
                        loss_mask=mask,
                        advantage=fb.broadcast_to_tokens(turn_adv, spans, n),
                        weight=(mask * w).astype(np.float32),
                        behavior_logp=logp * mask,
                        adapter_id=self.slot["assistant"],
                        role="assistant",
                        episode=ep.index,
                        reward=rec.reward,
                    )
                )
            labels = fb.checker_labels(rec, self.cfg)
            for call in ep.checks:
                label = labels[call.turn]
                if label is None:
                    continue
                target = self.verdict_ids[0] if label else self.verdict_ids[1]
                n = len(call.prompt) + 1
                one = np.zeros(n, np.float32)
                one[-1] = 1.0
                logp = one.copy()
                logp[-1] = call.logp2[0 if label else 1]
                rows.append(
                    TrainRow(
                        tokens=np.asarray([*call.prompt, target], np.int32),
                        loss_mask=one,
                        advantage=one.copy(),
                        weight=one.copy(),
                        behavior_logp=logp,
                        adapter_id=self.slot["checker"],
                        role="checker",
                        episode=ep.index,
                        reward=rec.reward,
                        label=bool(label),
                    )
                )
        return rows


# ------------------------------------------------------------------------- summaries + batches


def summarize(records: Sequence[fb.EpisodeRecord], cfg: CMATConfig | None = None) -> dict[str, Any]:
    """Reward, success rate, turn / rejection / error counts and Checker metrics of episodes."""
    cfg = cfg or CMATConfig()
    n = len(records)
    turns = [t for r in records for t in r.turns]
    rewards = np.array([r.reward for r in records], np.float64)
    checker = fb.checker_metrics(records, cfg)
    return {
        "episodes": n,
        "mean_reward": float(rewards.mean()) if n else 0.0,
        "success_rate": float((rewards >= cfg.success_threshold).mean()) if n else 0.0,
        "proposals": len(turns),
        "executed": sum(t.executed for t in turns),
        "rejections": sum(t.verdict == "reject" for t in turns),
        "revisions": sum(t.revision for t in turns),
        "error_rate": float(np.mean([bool(t.error) for t in turns if t.executed]))
        if turns
        else 0.0,
        "checker_precision": checker["precision"],
        "checker_recall": checker["recall"],
        "checker_accuracy": checker["accuracy"],
        "checker_n": checker["n"],
        "mean_p_accept_good": checker["mean_p_accept_good"],
        "mean_p_accept_bad": checker["mean_p_accept_bad"],
        "checker_auc": checker["auc"],
    }
