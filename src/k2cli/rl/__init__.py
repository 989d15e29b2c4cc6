"""Reinforcement learning (K2 section 3.2, K1.5's objective) on the synthetic world.

    env.py         the Gym-like API (reset/step, Observation), the registry, pools of problems per split
    world_envs.py  math, logic, instruct (verifiable) and chat (rubric reward) environments
    code_env.py    short Python functions checked by unit tests ...
    sandbox.py     ... isolated by the kernel (namespaces, dedicated uid, Landlock, seccomp, rlimits); the parent judges
    jail.py        the sandbox's child process: applies those layers to itself, then runs the snippet
    tool_env.py    the agentic tasks, multi-turn, judged by their rubrics
    rollout.py     many episodes advanced together, each turn one batched generation with the KV cache
    critic.py      the self-critique rubric reward: pairwise judgements, win rates, critic training pairs
    objective.py   K1.5's loss, the policy-gradient baseline, temperature schedule, length reward, budget penalty
    batch.py       rows of token ids -> the tensors of one step; the PTX rows
    evaluate.py    held-out rewards, prompt selection by pass@k, the critic's held-out pairs
    task.py        RLTask: the shared training loop's Task (rollouts -> batch -> loss)
    plots.py       rewards and rollout statistics as PNGs

The stage is `k2 rl` (stages/rl.py); the evaluation suite is `rl_envs` (eval/rl_envs.py).
"""
