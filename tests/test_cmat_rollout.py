"""The rollout engine on a tiny random model with a small deterministic scripted environment."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cmat_jax.cmat import feedback as fb
from cmat_jax.cmat import roles as R
from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.memory import LongTermMemory
from cmat_jax.cmat.rollout import (
    ChatTokens,
    RolloutConfig,
    RolloutEngine,
    checker_prompt_ids,
)
from cmat_jax.data.rows import rows_to_batch
from cmat_jax.envs.base import StepResult
from cmat_jax.inference.generate import Generator
from cmat_jax.model.lora import LoRAConfig
from cmat_jax.training.losses import token_logp
from cmat_jax.weights.load import load_model
from tests.fixtures_hf import save_tiny_model_dir


def _h(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclasses.dataclass(frozen=True)
class CountTask:
    task_id: str
    text: str


class ScriptedEnv:
    """Deterministic toy env: an action errors when its hash is 0 mod 3; the episode ends after
    `rounds` executed actions, with reward 1 when the hash of all executed actions is even.
    `steps_run` counts every step (counterfactual ones included) to check snapshot/restore."""

    family = "scripted"

    def __init__(self, rounds: int = 2):
        self.rounds = rounds
        self.steps_run = 0
        self.actions: list[str] = []
        self.task: CountTask | None = None

    def reset(self, task: CountTask) -> list[dict[str, str]]:
        self.task, self.actions = task, []
        return [{"role": "system", "content": "s"}, {"role": "user", "content": task.text}]

    @staticmethod
    def is_error(text: str) -> bool:
        return _h(text) % 3 == 0

    def step(self, agent_text: str) -> StepResult:
        self.steps_run += 1
        self.actions.append(agent_text)
        error = self.is_error(agent_text)
        if len(self.actions) >= self.rounds:
            reward = float(_h("".join(self.actions)) % 2 == 0)
            return StepResult("", True, reward, {"error": error})
        return StepResult("error: bad" if error else "ok 42", False, 0.0, {"error": error})

    def snapshot(self) -> Any:
        return list(self.actions)

    def restore(self, snap: Any) -> None:
        self.actions = list(snap)

    def transcript(self) -> dict[str, Any]:
        return {"actions": list(self.actions)}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=2048)
    model, tok = load_model(path, "float32")
    model.add_lora(LoRAConfig(rank=4, alpha=8.0, slots=("assistant", "checker")), rngs=nnx.Rngs(1))
    # Non-zero B so the two slots and the base give different outputs.
    for t, b in model.lora.b.items():
        key = jax.random.key(zlib.crc32(t.encode()))
        b.value = 0.05 * jax.random.normal(key, b.value.shape, b.value.dtype)
    return model, tok


TASKS = [CountTask(f"t{i}", f"Task {i}: SELECT the name of user {i}.") for i in range(3)]
ROLES = R.make_roles("scripted", assistant_prompt="You are an SQL programmer.")


def _engine(tiny, envs, *, cmat=None, rollout=None, ltm=None):
    model, tok = tiny

    def make_env():
        env = ScriptedEnv()
        envs.append(env)
        return env

    return RolloutEngine(
        model,
        tok,
        make_env,
        roles=ROLES,
        # One memory snippet with room for a random model's (long, garbled) trajectory summary.
        cmat_cfg=cmat or CMATConfig(group_size=3, ltm_k=1, ltm_token_budget=1500),
        rollout_cfg=rollout or RolloutConfig(max_new_tokens=8, max_context=2048),
        ltm=ltm,
    )


@pytest.fixture(scope="module")
def rollout(tiny, tmp_path_factory):
    envs: list[ScriptedEnv] = []
    ltm = LongTermMemory(tmp_path_factory.mktemp("ltm") / "ltm.sqlite")
    engine = _engine(tiny, envs, ltm=ltm)
    first = engine.run(TASKS, key=jax.random.key(3))
    # A second round reads the memory the first one wrote.
    second = engine.run(TASKS[:1], group_size=1, key=jax.random.key(4))
    yield first, second, envs, ltm
    ltm.close()


def test_rollout_checker_revisions_labels_advantages(tiny, rollout):
    _model, tok = tiny
    res, second, envs, ltm = rollout
    eps = res.episodes
    assert len(eps) == 9 and {e.group_id for e in eps} == {"g0", "g1", "g2"}
    st = res.stats
    # Rows of different roles share generate calls (rejection reasons beside proposals).
    assert st["mixed_calls"] >= 1 and st["verdict_calls"] >= 1
    # Revisions after rejections, never more than K in a row; rejected proposals not executed.
    assert st["rejections"] >= 1 and st["revisions"] >= 1
    for e in eps:
        run = 0
        done: list[str] = []
        for t in e.turns:
            assert t.verdict in ("accept", "reject") and 0.0 <= t.p_accept <= 1.0
            run = run + 1 if t.revision else 0
            assert run <= 2
            if not t.executed:
                assert t.verdict == "reject" and t.checker_reason
                # Counterfactual label from the env rule: an error is bad.
                if ScriptedEnv.is_error(t.proposal):
                    assert t.error is True and t.counterfactual_good is False
                elif len(done) + 1 == 2:  # it would have ended the episode: its own reward
                    assert t.error is False
                    assert t.counterfactual_good == (_h("".join([*done, t.proposal])) % 2 == 0)
                else:  # not terminal: the executed-proposal rule (episode success)
                    assert t.error is False and t.counterfactual_good == (e.reward >= 1.0)
            else:
                done.append(t.proposal)
        assert sum(t.executed for t in e.turns) == 2
    # Snapshot/restore: every env saw its executed steps plus one per rejected proposal.
    for env, e in zip(envs[: len(eps)], eps, strict=True):
        assert env.steps_run == len(e.turns)
        assert len(env.actions) == 2
    # Advantages and RWR weights on the tokens are exactly the feedback formulas (docs/method.md §4).
    adv = fb.episode_advantages(eps, CMATConfig(group_size=3), fb.RunningBaseline())
    w = fb.rwr_weights([e.reward for e in eps], [e.group_id for e in eps], 0.5)
    a_rows = [r for r in res.rows if r.role == "assistant"]
    assert len(a_rows) == 9  # one token row per episode: its whole trajectory
    for r in a_rows:
        e = eps[r.episode]
        spans = _spans(r.loss_mask)
        assert len(spans) == len(e.turns)
        for (s, t_end), a_t, turn in zip(spans, adv[r.episode], e.turns, strict=True):
            np.testing.assert_allclose(r.advantage[s:t_end], a_t, rtol=1e-6)
            np.testing.assert_allclose(r.weight[s:t_end], w[r.episode], rtol=1e-6)
            assert tok.decode(r.tokens[s:t_end]).startswith(turn.proposal)
        assert r.adapter_id == 0
    c_rows = [r for r in res.rows if r.role == "checker"]
    assert c_rows and all(r.adapter_id == 1 and r.loss_mask.sum() == 1 for r in c_rows)
    labels = [lab for e in eps for lab in fb.checker_labels(e) if lab is not None]
    assert len(c_rows) == len(labels)
    accept_id, reject_id = R.verdict_token_ids(tok)
    assert sorted(int(r.tokens[-1]) for r in c_rows) == sorted(
        accept_id if lab else reject_id for lab in labels
    )
    # Every episode went to long-term memory the moment it ended; failed ones with a reflection
    # (the Reflector's text; a random model may produce an empty lesson).
    assert len(ltm) == 10
    for e, refl in zip(eps, res.reflections, strict=True):
        if e.reward >= 1:
            assert refl == ""
    stored = {(r.task_id, r.reflection) for r in ltm.records("scripted")}
    assert all((e.task_id, refl) in stored for e, refl in zip(eps, res.reflections, strict=True))
    # The next episode of a task starts with the lessons / similar solved tasks from memory.
    prompt = tok.decode(second.rows[0].tokens)
    assert "Lessons from earlier attempts" in prompt


def test_rejection_reasons_have_their_own_token_limit(tiny):
    envs: list[ScriptedEnv] = []
    engine = _engine(
        tiny,
        envs,
        cmat=CMATConfig(group_size=3),
        rollout=RolloutConfig(max_new_tokens=8, reason_max_new_tokens=2, max_context=2048),
    )
    calls = []
    real = engine.gen.generate

    def recording(prompts, **kw):
        out = real(prompts, **kw)
        if kw.get("score_ids"):  # a verdict call: the prompts' next-token scores only
            assert kw["max_new_tokens"] == 1 and set(kw["adapter_ids"]) == {engine.slot["checker"]}
            return out
        calls.append((list(kw["adapter_ids"]), list(kw["max_new_tokens"]), out.lengths.tolist()))
        return out

    engine.gen.generate = recording
    res = engine.run(TASKS[:2], key=jax.random.key(3))
    assert res.stats["revisions"] >= 1
    checker = engine.slot["checker"]
    rows = [row for ids, lims, lens in calls for row in zip(ids, lims, lens, strict=True)]
    reasons = [(lim, n) for a, lim, n in rows if a == checker]
    # One reason row per revision, each cut at its own limit; the proposals keep theirs.
    assert len(reasons) == res.stats["revisions"]
    assert all(lim == 2 and 1 <= n <= 2 for lim, n in reasons)
    assert all(lim == 8 for a, lim, _ in rows if a != checker)
    assert max(n for a, _, n in rows if a != checker) > 2


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*list(mask), 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_behaviour_logp_matches_teacher_forcing(tiny, rollout):
    """Rows are token-exact: re-scoring them at the rollouts' sampling temperature gives the
    sampled tokens' (and the Checker's verdicts') behaviour log-probs — and at temperature 1
    it does not, so the loss must score at the sampler's τ (LossConfig.temperature)."""
    model, _tok = tiny
    res = rollout[0]
    tau = RolloutConfig().temperature
    assert tau != 1.0
    batch = rows_to_batch(res.rows, seq_len=max(len(r.tokens) for r in res.rows))
    m = batch["loss_mask"] > 0
    checker = batch["adapter_ids"] == 1
    assert m.sum() > 10 and m[checker].sum() >= 1
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    for t, close in ((tau, True), (1.0, False)):
        logp = np.asarray(jax.jit(lambda b, t=t: token_logp(model, b, temperature=t))(b))
        err = np.abs(logp[m] - batch["behavior_logp"][m]).max()
        assert (err < 0.05) == close, (t, err)


def test_verdict_scores_match_full_forward(tiny):
    """The verdict's log-probs come from the generator's prefill (`score_ids`): they equal the
    full forward's next-token log-probs for a batch of two prompt lengths."""
    model, tok = tiny
    ids = R.verdict_token_ids(tok)
    prompts = [tok.encode("Task: count rows. Verdict:"), tok.encode("Short. Verdict:")]
    got = Generator(model, tok, cache_dtype="float32").generate(
        prompts, max_new_tokens=1, adapter_ids=[1, 1], score_ids=ids, eos_ids=[]
    )
    forward = jax.jit(lambda x: jax.nn.log_softmax(model(x, adapter_ids_B=jnp.asarray([1]))[0, -1]))
    assert got.scores.shape == (2, 2)
    for p, row in zip(prompts, got.scores, strict=True):
        np.testing.assert_allclose(row, np.asarray(forward(jnp.asarray([p])))[list(ids)], atol=1e-4)


def test_chat_tokens_grow_like_the_template(tiny):
    _, tok = tiny
    chat = ChatTokens(tok)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
    reply = "Action: Answer"
    eos = tok.encode("<|im_end|>")
    grown = chat.head(msgs) + tok.encode(reply) + eos + chat.feedback("obs", ended_with_eos=True)
    full = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "obs"}]
    rendered = tok.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
    assert tok.decode(grown) == rendered


def test_training_rows_fit_the_context_and_keep_the_task(tiny):
    """Long episodes in a short context: prompts are rebuilt from short-term memory, so every
    row fits `max_context` whole, starts with the system prompt and task, and ends with a
    proposal."""
    model, tok = tiny
    envs: list[ScriptedEnv] = []
    head = ChatTokens(tok).head(R.assistant_messages(ROLES.assistant, TASKS[0].text))
    max_context = len(head) + 160
    engine = RolloutEngine(
        model,
        tok,
        lambda: envs.append(ScriptedEnv(rounds=8)) or envs[-1],
        roles=ROLES,
        cmat_cfg=CMATConfig(group_size=2, ltm_k=0, max_revisions=1),
        rollout_cfg=RolloutConfig(max_new_tokens=8, max_context=max_context, ltm_split=""),
    )
    res = engine.run(TASKS[:1], key=jax.random.key(5))
    assert res.stats["context_rebuilds"] >= 1
    a_rows = [r for r in res.rows if r.role == "assistant"]
    assert len(a_rows) > len(res.episodes)  # rebuilt prompts start new rows
    for r in a_rows:
        assert len(r.tokens) <= max_context
        # The system prompt and the task open every row (a rebuilt one may note omitted steps).
        text = tok.decode(r.tokens)
        first_reply = text.index("<|im_start|>assistant")
        assert text.startswith(tok.decode(head[:3])) and ROLES.assistant.system_prompt in text
        assert text.index(TASKS[0].text) < first_reply
        assert r.loss_mask[-1] == 1.0
    c_rows = [r for r in res.rows if r.role == "checker"]
    assert c_rows and all(len(r.tokens) <= max_context for r in c_rows)
    batch = rows_to_batch(res.rows, seq_len=max_context - 1)
    assert batch["inputs"].shape == (len(res.rows), max_context - 1)
    with pytest.raises(ValueError, match="exceed seq_len"):
        rows_to_batch(res.rows, seq_len=len(head))


def test_checker_prompt_drops_old_steps_not_its_instructions(tiny):
    _, tok = tiny
    history = []
    for i in range(6):
        history += [
            {"role": "assistant", "content": f"Action: Operation\nSELECT name FROM t{i};"},
            {"role": "user", "content": f"[('row {i}',)]"},
        ]
    args = (tok, ROLES.checker, TASKS[0].text)
    bare = checker_prompt_ids(*args, [], "SELECT 1;", 10_000)
    full = checker_prompt_ids(*args, history, "SELECT 1;", 10_000)
    limit = (len(bare) + len(full)) // 2
    ids = checker_prompt_ids(*args, history, "SELECT 1;", limit)
    text = tok.decode(ids)
    assert len(bare) < len(ids) <= limit < len(full)
    assert text.startswith(tok.decode(bare[:8])) and TASKS[0].text in text
    assert "row 5" in text and "row 0" not in text  # the newest steps stay
    assert text.endswith(tok.decode(bare[-4:]))  # still asks for the verdict


def test_prefix_reuse_gives_the_same_rollout(tiny):
    """Greedy rollouts with and without reusing cached prompt prefixes across calls are token
    for token the same (f32), and the reusing one prefills fewer prompt tokens."""
    results = []
    for reuse in (False, True):
        cfg = RolloutConfig(max_new_tokens=8, max_context=2048, temperature=0.0, reuse_prefix=reuse)
        results.append(_engine(tiny, [], rollout=cfg).run(TASKS[:2], key=jax.random.key(5)))
    plain, reused = results
    assert plain.stats["reused_prompt_tokens"] == 0
    total = plain.stats["prefilled_prompt_tokens"]
    assert reused.stats["reused_prompt_tokens"] + reused.stats["prefilled_prompt_tokens"] == total
    # Reason rows reuse their verdict prompt, assistant turns their episode's history (45%).
    assert reused.stats["reused_prompt_tokens"] > 2 * total // 5
    assert len(plain.rows) == len(reused.rows) > 0
    for a, b in zip(plain.rows, reused.rows, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.behavior_logp, b.behavior_logp, atol=1e-4)
    assert [e.reward for e in plain.episodes] == [e.reward for e in reused.episodes]
