"""k2 rl: the K1.5 objective, budgets, PTX, temperature, environments and their verifiers, the sandbox,
the critic, bad input, and real (micro) runs with exact resume."""

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_clean_error
from helpers import model_artifact
from k2cli.data.chat import ParsedTurn, render_text
from k2cli.errors import Interrupted, K2Error
from k2cli.recipes import resolve_recipe
from k2cli.rl import objective as obj
from k2cli.rl.batch import CRITIC, PTX, RL, rows_to_tensors
from k2cli.rl.critic import Critic, CriticConfig, Pair
from k2cli.rl.env import env_class
from k2cli.rl.rollout import run_rollouts, start
from k2cli.rl.sandbox import run_tests
from k2cli.stages.runner import RunOptions

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro world (synth), its agentic tasks, and a micro 'sft' chat model with both in its lineage."""
    import datasets

    from k2cli.stages import agentic, synth

    root = tmp_path_factory.mktemp("rlworld")
    saved = os.environ.get("K2_ARTIFACTS")
    os.environ["K2_ARTIFACTS"], os.environ["K2_QUIET"] = str(root), "1"
    try:
        data = synth.run(resolve_recipe(synth.SynthRecipe, "synth", "micro", None, ())[0])
        tasks = agentic.run(resolve_recipe(agentic.AgenticRecipe, "agentic", "micro", None, ())[0])
        texts = list(datasets.load_from_disk(str(data.path / "corpus"))["text"])
        chats = datasets.load_from_disk(str(tasks.path / "chat"))[:40]
        texts += [render_text(json.loads(m), json.loads(t) if t else None) for m, t in zip(chats["messages"], chats["tools"])]
        model = model_artifact(texts, inputs=[data, tasks], stage="sft", vocab_size=600, max_position_embeddings=512)
    finally:
        os.environ["K2_ARTIFACTS"] = saved or ""
    return SimpleNamespace(data=data, agentic=tasks, model=model)


def micro_recipe(world, *overrides):
    from k2cli.stages.rl import RLRecipe

    recipe, _ = resolve_recipe(RLRecipe, "rl", "micro", None, (f"model={world.model.path}",) + overrides)
    return recipe


def micro_task(world, *overrides):
    """The stage's setup without the starting model's held-out numbers (not needed here, and slow for tools)."""
    from k2cli.stages import rl

    return rl.setup(micro_recipe(world, "rl.eval_prompts=0", "critic.heldout_prompts=0", *overrides), resume="no")


def scripted_generate(script):
    """A stand-in for model.generate: row i of every call gets script(prompt ids) as its new tokens."""
    def fake(model, prompts, max_new_tokens=0, **kw):
        return [script(p)[:max_new_tokens] for p in prompts]
    return fake


# ----------------------------------------------------------------------------- the objective


def test_k15_loss_against_a_hand_computed_example():
    # one prompt, K = 2: rewards 1 and 0 -> rbar 0.5 -> advantages +0.5 and -0.5
    r, group = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    adv = obj.advantages(r, group, 1)
    assert adv.tolist() == [0.5, -0.5]
    logp, old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -1.5])  # log ratios +0.2 and -0.5
    w = torch.tensor([0.5, 0.5])  # 1/K
    # tau = 0.1: ((0.5 - 0.02)^2 + (-0.5 + 0.05)^2) / 2 / (2 * 0.1) = (0.2304 + 0.2025) / 0.4
    assert obj.policy_loss(logp, old, adv, w, 0.1).item() == pytest.approx(1.08225)
    # tau = 1: ((0.5 - 0.2)^2 + (-0.5 + 0.5)^2) / 2 / 2 = 0.0225
    assert obj.policy_loss(logp, old, adv, w, 1.0).item() == pytest.approx(0.0225)
    # tau's effect on the gradient wrt log pi: -(A - tau * log ratio) / K: a larger tau pulls back towards pi_old
    for tau in (0.1, 1.0):
        lp = logp.clone().requires_grad_()
        obj.policy_loss(lp, old, adv, w, tau).backward()
        assert lp.grad.tolist() == pytest.approx([-(0.5 - tau * 0.2) / 2, -(-0.5 + tau * 0.5) / 2])
    # plain PG: -mean(A * log pi) = -(0.5 * -1 + -0.5 * -2) / 2 = -0.25
    assert obj.policy_loss(logp, old, adv, w, 0.1, kind="pg").item() == pytest.approx(-0.25)


def test_gradient_at_theta_old_is_the_mean_baseline_policy_gradient():
    from helpers import MICRO
    from k2cli.model.config import ModelConfig
    from k2cli.model.transformer import build_model

    model = build_model(ModelConfig(name="micro", vocab_size=50, **MICRO), seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (6, 12), generator=g)
    targets = torch.randint(0, 50, (6, 12), generator=g)
    targets[:, :4] = -100  # the prompt part carries no loss
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = obj.advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0]), group, 2)
    w = torch.full((6,), 1 / 3)

    def grads(kind, shift=0.0):
        model.zero_grad()
        _, seq = obj.sequence_logprobs(model(ids), targets)
        obj.policy_loss(seq, seq.detach() + shift, adv, w, 0.3, kind).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    pg = grads("pg")
    assert torch.allclose(grads("k15"), pg, atol=1e-6)  # log ratio 0: exactly the policy gradient
    assert not torch.allclose(grads("k15", shift=0.5), pg, atol=1e-4)  # away from pi_old the trust-region term acts


def test_temperature_schedules():
    for schedule in ("linear", "cosine", "exponential"):
        cfg = obj.TemperatureConfig(start=1.2, end=0.6, schedule=schedule)
        temps = [obj.temperature_at(s, 11, cfg) for s in range(11)]
        assert temps[0] == pytest.approx(1.2) and temps[-1] == pytest.approx(0.6)
        assert all(a >= b for a, b in zip(temps, temps[1:]))  # decays monotonically
    assert obj.temperature_at(5, 11, obj.TemperatureConfig(start=0.9, schedule="constant")) == 0.9
    assert obj.temperature_at(5, 11, obj.TemperatureConfig(1.0, 0.5, "linear")) == pytest.approx(0.75)
    with pytest.raises(K2Error, match="temperature.schedule"):
        obj.TemperatureConfig(schedule="sawtooth").validate()


def test_length_reward_and_budget_penalty():
    # lengths 10 / 20 / 30: lambda = 0.5 / 0 / -0.5; correct gets lambda, wrong gets min(0, lambda)
    assert obj.length_rewards([10, 20, 30], [True, False, False]) == [0.5, 0.0, -0.5]
    assert obj.length_rewards([10, 30], [False, True]) == [0.0, -0.5]
    assert obj.length_rewards([7, 7], [True, False]) == [0.0, 0.0]
    assert obj.budget_penalty(1.0, True, 0.5) == 0.5 and obj.budget_penalty(1.0, False, 0.5) == 1.0


# ----------------------------------------------------------------------------- rollouts, budgets, PTX


def test_budget_truncates_and_penalises(world, monkeypatch):
    s = micro_task(world, "envs.mix={math=1.0}", "envs.budget={math=5}")
    tok, pool = s.tokenizer, s.pools["math"]
    answer = pool.train[0]["answer"]
    end = tok.token_id("<|im_end|>")
    short = tok.encode(f"The answer is {answer}.") + [end]
    long = tok.encode(f"The answer is {answer}. " * 4)
    trajs = [start(pool.make(), "math", 0, 0, 0, tok) for _ in range(2)]
    scripts = iter([short, long])
    monkeypatch.setattr("k2cli.rl.rollout.generate", scripted_generate(lambda p: next(scripts)))
    budget = {"math": len(short)}
    run_rollouts(s.model, tok, trajs, budget, 192, 1.0, 0)
    fin, cut = trajs
    assert not fin.truncated and fin.reward == 1.0 and sum(fin.mask) == len(short)
    assert cut.truncated and cut.generated == len(short) and sum(cut.mask) == len(short)  # cut at the budget
    assert cut.ids[-len(short):] == long[: len(short)]
    groups, stats = s.task.rewards(trajs)
    assert [t.info["final"] for t in groups[0]] == [1.0, cut.reward - 0.5]  # the recipe's budget_penalty
    assert stats["truncated_rate"] == 0.5


def test_multi_turn_tool_episode_keeps_the_policy_tokens_apart(world, monkeypatch):
    from k2cli.agentic.policies import PlannerPolicy

    s = micro_task(world, "envs.mix={tools=1.0}", "envs.budget={tools=150}", "train.seq_len=512", "envs.tool_turns=6")
    tok, pool = s.tokenizer, s.pools["tools"]
    solved = [i for i, p in enumerate(pool.train) if not p["task"]["user"]["withheld"]][0]
    planner = PlannerPolicy()
    traj = start(pool.make(), "tools", 0, solved, 0, tok)

    def planner_turn(prompt):  # what the planner would write, as the tokens a model emits
        return tok.encode(render_text([planner.next_turn(traj.env.episode).message()]).split("<|im_assistant|>assistant<|im_middle|>", 1)[1])

    monkeypatch.setattr("k2cli.rl.rollout.generate", scripted_generate(planner_turn))
    run_rollouts(s.model, tok, [traj], {"tools": 150}, 512, 1.0, 0)
    assert traj.done and not traj.truncated and traj.reward == 1.0 and traj.info["correct"]
    assert len(traj.turns) >= 2  # a tool call, then the answer
    policy_text = tok.decode([i for i, m in zip(traj.ids, traj.mask) if m])
    assert "<|tool_call_begin|>" in policy_text and "## Return of" not in policy_text  # tool results are observations


def test_ptx_and_critic_rows_in_the_loss(world):
    s = micro_task(world, "envs.mix={math=1.0}", "ptx.beta=0.3", "critic.weight=0.0")
    task, tok = s.task, s.tokenizer
    ptx = task.ptx[:2]
    # no RL rows: the PTX rows carry the unit, the loss is beta x the mean next-token loss of their target tokens
    batch, _ = task.assemble([], ptx, [])
    loss, _, _ = task.loss(s.model, batch, False)
    t = rows_to_tensors(ptx, tok.eot_id)
    ce = torch.nn.functional.cross_entropy(s.model(t["input_ids"]).flatten(0, 1), t["targets"].flatten(), ignore_index=-100)
    assert (batch["kind"] == PTX).all()
    assert (loss / task.weight(batch)).item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    # with one RL prompt next to them: the PTX part is still beta x its mean, on top of the K1.5 loss
    traj = [start(s.pools["math"].make(), "math", 0, 0, 0, tok) for _ in range(2)]
    for x, r in zip(traj, (1.0, 0.0)):
        x.ids, x.mask, x.info = x.ids + [5, 6], x.mask + [True, True], {"final": r}
    batch, _ = task.assemble([traj], ptx, [])
    assert task.weight(batch) == pytest.approx(1.0)  # one prompt
    loss, _, _ = task.loss(s.model, batch, False)
    rl_part = 2 * 0.5 ** 2 / (2 * task.cfg.tau) / 2  # log ratio 0 at pi_old: A^2 / (2 tau), mean over K
    assert loss.item() == pytest.approx(rl_part + 0.3 * ce.item(), rel=1e-4)
    assert (batch["kind"] == RL).sum() == 2


def test_k15_shift_is_zero_on_policy_and_tau_times_the_log_ratio_off_it(world):
    """The logged diagnostic of how far K1.5's gradient weights (A - tau d) are from plain PG's (A)."""
    s = micro_task(world, "envs.mix={math=1.0}", "ptx.beta=0.0", "critic.weight=0.0")
    task, tok = s.task, s.tokenizer
    traj = [start(s.pools["math"].make(), "math", 0, 0, 0, tok) for _ in range(2)]
    for x, r in zip(traj, (1.0, 0.0)):
        x.ids, x.mask, x.info = x.ids + [5, 6], x.mask + [True, True], {"final": r}
    batch, _ = task.assemble([traj], [], [])  # old_logp from the current weights: theta = theta_old
    _, extras, _ = task.loss(s.model, batch, False)
    assert extras["k15_shift"].item() == pytest.approx(0.0, abs=1e-5) and extras["adv_abs"].item() == pytest.approx(1.0)
    assert extras["log_ratio_abs_max"].item() == pytest.approx(0.0, abs=1e-4)
    # pi_old 0.4 nats below theta on both samples: sum |tau d| / sum |A| = tau * 0.4 / 0.5
    batch["old_logp"] = batch["old_logp"] - 0.4
    _, extras, _ = task.loss(s.model, batch, False)
    assert extras["k15_shift"].item() / extras["adv_abs"].item() == pytest.approx(task.cfg.tau * 0.4 / 0.5, rel=1e-3)
    assert extras["log_ratio_mean"].item() == pytest.approx(0.4, rel=1e-3)


# ----------------------------------------------------------------------------- environments and verifiers


def turn(text):
    return ParsedTurn(content=text)


def test_verifiers_true_and_false(world):
    from k2cli.rl.env import EnvConfig, build_pools, load_world_data
    from k2cli.data.tokenizer import load_tokenizer

    data = load_world_data(world.model, EnvConfig())
    pools = build_pools(data, EnvConfig(train_size=20, test_size=5), ["math", "logic", "instruct", "chat"],
                        load_tokenizer(world.model.path), 256)

    def score(name, problem, text):
        env = pools[name].make()
        return env.score(problem, turn(text))

    m = pools["math"].train[0]
    assert score("math", m, f"Solution: ... The answer is {m['answer']}.")[0] == 1.0
    assert score("math", m, f"The answer is {int(m['answer']) + 1}.")[0] == 0.0
    lg = pools["logic"].train[0]
    other = next(o for o in lg["options"] if o != lg["answer"])
    assert score("logic", lg, f"{lg['answer']}.")[0] == 1.0
    assert score("logic", lg, f"{other}.")[0] == 0.0
    assert score("logic", lg, f"{lg['answer']} or {other}")[0] == 0.0  # naming two options is not an answer
    from k2cli.rl.world_envs import check_constraint

    cases = [("max_words", {"n": 3}, "Oslo is nice", "Oslo is very nice"),
             ("keyword", {"word": "Lima"}, "She works in lima.", "She works in Oslo."),
             ("json", {"key": "city"}, '{"city": "Oslo"}', '{"town": "Oslo"}'),
             ("starts_with", {"word": "Sure"}, "Sure, Oslo.", "Oslo, sure."),
             ("lowercase", {}, "oslo it is", "Oslo it is"),
             ("no_comma", {}, "Oslo and Lima", "Oslo, Lima")]
    for name, args, good, bad in cases:
        assert check_constraint(name, args, good) and not check_constraint(name, args, bad), name
    ins = {"prompt": "x", "constraints": [{"name": "keyword", "args": {"word": "Oslo"}}, {"name": "no_comma", "args": {}}]}
    assert score("instruct", ins, "Oslo") == (1.0, {"correct": True, "met": {"keyword": True, "no_comma": True}})
    assert score("instruct", ins, "Lima, yes")[0] == 0.0 and score("instruct", ins, "Oslo, yes")[0] == 0.5
    ch = pools["chat"].train[0]
    assert score("chat", ch, " ".join(ch["facts"]))[1]["facts"] == 1.0 and score("chat", ch, "hello")[1]["facts"] == 0.0
    assert not pools["chat"].env.verifiable and score("chat", ch, "x")[0] == 0.0


def test_code_verifier_runs_unit_tests_in_the_sandbox():
    code_env = env_class("code")
    problem = {"prompt": "add", "function": "add", "tests": [["add(0)", 5], ["add(2)", 7], ["add(-3)", 2]]}
    env = code_env([problem])
    assert env.score(problem, turn("```python\ndef add(x):\n    return x + 5\n```")) [0] == 1.0
    wrong = env.score(problem, turn("def add(x):\n    return x + 4"))
    assert wrong[0] == 0.0 and wrong[1]["status"] == "ok"
    assert env.score(problem, turn("def add(x):\n    return 5 if x == 0 else 0"))[0] == pytest.approx(1 / 3)
    assert env.score(problem, turn("I cannot do that."))[1]["status"] == "no_code"
    runaway = env.score(problem, turn("def add(x):\n    while True:\n        pass\n"))
    assert runaway[0] == 0.0 and runaway[1]["status"] in ("timeout", "killed")


def test_sandbox_kills_runaway_code_and_blocks_writes_outside_its_directory(tmp_path):
    res = run_tests("while True:\n    pass\n", [], timeout_s=1.0)
    assert res.status in ("timeout", "killed")
    outside = tmp_path / "escaped.txt"
    for attack in (f"open({str(outside)!r}, 'w').write('x')",
                   f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
                   "open('../escaped.txt', 'w').write('x')",
                   f"import os\nos.system('touch {outside}')",
                   "try:\n    open('/tmp/k2-escaped.txt', 'w')\nexcept Exception:\n    pass\ndef f():\n    return 1\n"):
        res = run_tests(attack, ["f()"])
        assert res.status in ("blocked", "error"), (attack, res)  # never "ok": a caught refusal still ends the run
    assert not outside.exists() and not os.path.exists("/tmp/k2-escaped.txt")
    assert run_tests("import subprocess", []).status == "error"  # not importable
    assert run_tests("x = bytearray(2 ** 34)", []).status in ("error", "killed")  # over the memory limit
    ok = run_tests("open('scratch.txt', 'w').write('fine')\ndef f():\n    return open('scratch.txt').read()\n", ["f()"])
    assert ok.status == "ok" and ok.outputs == ["fine"]  # its own directory is writable
    forged = run_tests("print('{\"status\": \"ok\", \"outputs\": [1]}')\ndef f():\n    return 0\n", ["f()"])
    assert forged.outputs == [0]  # what the snippet prints never reaches the verdict


def _honest_code(problem):
    """A correct solution of a code problem: its tests as a lookup table ("add(7)" -> (7,): 12)."""
    fn = problem["function"]
    table = ", ".join(f"({call[len(fn) + 1:-1]},): {want!r}" for call, want in problem["tests"])
    return f"```python\nT = {{{table}}}\ndef {fn}(*a):\n    return T.get(a)\n```"


def test_code_env_trains_in_the_sandbox_and_refuses_without_isolation(world, monkeypatch, k2):
    from k2cli.artifacts import open_artifact
    from k2cli.rl import sandbox

    code_env = env_class("code")
    real, seen = code_env.score, []

    def every_other_honest(self, problem, t):  # the micro policy writes no code: make half the replies real code
        seen.append(real(self, problem, turn(_honest_code(problem)) if len(seen) % 2 else t))
        return seen[-1]

    monkeypatch.setattr(code_env, "score", every_other_honest)
    k2("rl", world.model.path, "--preset", "micro", "--set", "envs.mix={code=1.0}", "--set", "train.steps=2")
    assert open_artifact("rl:latest", kind="model").metrics
    ran = [info for reward, info in seen if info["status"] != "no_code"]
    assert ran and all(i["status"] == "ok" and i["correct"] for i in ran)  # honest code passes, in the real sandbox

    none = sandbox.Isolation((), False, "this machine offers no isolation for model-written code")
    monkeypatch.setattr(sandbox, "isolation", lambda: none)
    assert_clean_error(k2("rl", world.model.path, "--preset", "micro", "--set", "envs.mix={code=1.0}", ok=False),
                       "refusing to run model-written code", "--unsafe-sandbox")
    sandbox._warn_unsafe.cache_clear()
    unsafe = k2("rl", world.model.path, "--preset", "micro", "--set", "envs.mix={code=1.0}", "--set", "train.steps=1",
                "--unsafe-sandbox", "--out", "rl-unsafe")
    assert "WITHOUT isolation" in unsafe.output
    assert open_artifact("rl-unsafe:latest", kind="model").recipe["envs"]["unsafe_sandbox"] is True  # on the record


def test_tool_env_rewards_by_rubric(world):
    from k2cli.rl.env import EnvConfig, build_pools, load_world_data
    from k2cli.data.tokenizer import load_tokenizer

    data = load_world_data(world.model, EnvConfig(), need_agentic=True)
    pool = build_pools(data, EnvConfig(), ["tools"], load_tokenizer(world.model.path), 512)["tools"]
    env = pool.make()
    obs = env.reset(0, index=0)
    assert obs.tools and obs.messages[0]["role"] == "system"
    _, reward, done, info = env.step("I do not know.<|im_end|>")
    while not done:
        _, reward, done, info = env.step("I do not know.<|im_end|>")
    assert reward == 0.0 and info["correct"] is False


def test_registry_lists_valid_names_for_an_unknown_one():
    with pytest.raises(K2Error) as e:
        env_class("poetry")
    line = e.value.line()
    assert "unknown RL environment 'poetry'" in line
    for name in ("chat", "code", "instruct", "logic", "math", "tools"):
        assert name in line


# ----------------------------------------------------------------------------- the critic


def test_critic_win_rates_and_accuracy_are_order_debiased(world):
    from k2cli.data.tokenizer import load_tokenizer
    from k2cli.model.io import load_model

    model, _ = load_model(world.model.path)
    critic = Critic(model, load_tokenizer(world.model.path), 256, CriticConfig())
    pairs = [Pair("What is 2 + 2?", "right answer", "The answer is 4.", "The answer is 5.", 0),
             Pair("What is 2 + 3?", "right answer", "The answer is 6.", "The answer is 5.", 1)]
    p = critic.prefer(pairs)
    swapped = critic.prefer([Pair(x.request, x.rubric, x.b, x.a) for x in pairs])
    assert p == pytest.approx([1 - q for q in swapped])  # judging both orders: no position bias
    wins = critic.win_rates([("q", "r", ["a", "b", "c"])])[0]
    assert sum(wins) == pytest.approx(1.5)  # soft round robin: every pair shares one win
    assert 0.0 <= critic.accuracy(pairs) <= 1.0
    rows = critic.rows(pairs[:1])
    assert len(rows) == 2 and [ids[-1] for ids, _ in rows] == critic.verdict_ids  # A, then B once swapped
    assert all(sum(m) == 1 for _, m in rows)


# ----------------------------------------------------------------------------- runs


def test_rl_end_to_end_and_sigint_resume_is_exact(world, monkeypatch):
    from k2cli.rl.task import RLTask
    from k2cli.stages import rl
    from k2cli.train.progress import read_metrics

    recipe = micro_recipe(world, "envs.mix={math=1.0,logic=1.0,instruct=1.0,chat=1.0}")
    full = rl.run(recipe, RunOptions(resume="no"))
    hist = read_metrics(full.path / "metrics.jsonl")
    assert len(hist) == 4 and "heldout_math" in hist[-1] and "reward_mean" in hist[0] and "temperature" in hist[0]
    assert full.metrics["chat"] is True and "start_heldout_math" in full.metrics and full.has("rollouts.jsonl")
    assert full.has("rewards.png") and full.has("rollouts.png")
    logged = [json.loads(line) for line in (full.path / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} == {1, 3} and all("response" in r and "reward" in r for r in logged)

    batch = RLTask.batch

    def interrupt(self, step):  # while making the rollouts of step 3 (0-based 2), which step 4 reuses
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step)

    monkeypatch.setattr(RLTask, "batch", interrupt)
    with pytest.raises(Interrupted, match="after step 3/4"):  # so the resumed run starts mid-iteration
        rl.run(recipe, RunOptions(resume="no"))
    monkeypatch.setattr(RLTask, "batch", batch)
    resumed = rl.run(recipe)
    a, b = read_metrics(full.path / "metrics.jsonl"), read_metrics(resumed.path / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    from safetensors.torch import load_file

    wa, wb = load_file(str(full.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_failing_reward_functions_drop_samples_and_the_run_goes_on(world, monkeypatch, k2):
    from k2cli.artifacts import open_artifact

    math_env = env_class("math")
    real = math_env.score
    calls = {"n": 0}

    def flaky(self, problem, turn):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise ValueError("broken reward function")
        if calls["n"] % 3 == 1:
            return float("nan"), {}
        return real(self, problem, turn)

    monkeypatch.setattr(math_env, "score", flaky)
    k2("rl", world.model.path, "--preset", "micro", "--set", "envs.mix={math=1.0}", "--set", "rl.loss=pg",
       "--set", "rl.samples_per_prompt=4")
    art = open_artifact("rl:latest", kind="model")
    assert art.metrics["dropped_samples"] > 0 and art.recipe["rl"]["loss"] == "pg"


def test_separate_critic_model_trains_itself(world):
    s = micro_task(world, f"critic.model={world.model.path}", "envs.mix={math=1.0,chat=1.0}", "rl.samples_per_prompt=4")
    task = s.task
    assert task.critic.separate and task.critic.model is not s.model
    before = {k: v.clone() for k, v in task.critic.model.state_dict().items()}
    from k2cli.rl.critic import Pair

    loss = task.critic.train_step([Pair("q", "r", "right", "wrong", 0)])
    assert loss is not None and any(not torch.equal(before[k], v) for k, v in task.critic.model.state_dict().items())
    state = task.critic.state_dict()
    assert set(state) == {"model", "optimizer"}  # saved in checkpoints for exact resume
    batch = task.batch(0)
    assert not (batch["kind"] == CRITIC).any()  # its pairs never enter the policy's batch


def test_rl_envs_eval_suite(world, k2):
    from k2cli.artifacts import open_artifact

    k2("eval", world.model.path, "--suite", "rl_envs", "--set", "eval.max_examples=1", "--set", "eval.batch_size=8")
    results = json.loads((open_artifact("eval:latest").path / "results.json").read_text())
    m = results["models"][0]["suites"]["rl_envs"]["metrics"]
    for key in ("math_reward", "logic_reward", "instruct_reward", "code_reward", "chat_facts", "mean_reward"):
        assert key in m and math.isfinite(m[key]), key


def test_bad_inputs(world, k2):
    model = world.model.path
    assert_clean_error(k2("rl", model, "--preset", "micro", "--set", "envs.mix={poetry=1.0}", ok=False),
                       "unknown RL environment 'poetry'", "valid:", "math", "logic")
    assert_clean_error(k2("rl", model, "--preset", "micro", "--set", "rl.samples_per_prompt=1", ok=False),
                       "at least 2 samples per prompt")
    assert_clean_error(k2("rl", model, "--preset", "micro", "--set", "envs.budget={math=500}", ok=False),
                       "envs.budget.math=500", "context")
    assert_clean_error(k2("rl", model, "--preset", "micro", "--set", f"critic.model={world.data.path}", ok=False),
                       "dataset artifact, expected model")
    assert_clean_error(k2("rl", world.data.path, "--preset", "micro", ok=False), "expected model")
    assert_clean_error(k2("rl", model, "--preset", "micro", "--set", "rl.loss=ppo", ok=False), "unknown rl.loss")
