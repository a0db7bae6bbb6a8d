"""Environments: the Env protocol, the AgentBench DB task (DBBench) on SQLite or MariaDB, and
synthetic DB tasks with a scripted expert. Importing this package registers the families."""

from cmat_jax.envs.base import Env, EnvError, StepResult, counterfactual_step, make_env
from cmat_jax.envs.dbbench import DBBenchEnv, DBTask, dbbench_metrics, load_tasks

__all__ = [
    "DBBenchEnv",
    "DBTask",
    "Env",
    "EnvError",
    "StepResult",
    "counterfactual_step",
    "dbbench_metrics",
    "load_tasks",
    "make_env",
]
