"""Environments: the Env protocol, the AgentBench DB task (DBBench) on SQLite or MariaDB,
synthetic DB tasks with a scripted expert, and the AgentBench OS task in an isolated sandbox.
Importing this package registers the families."""

from cmat_jax.envs.base import Env, EnvError, StepResult, counterfactual_step, make_env
from cmat_jax.envs.dbbench import DBBenchEnv, DBTask, dbbench_metrics, load_tasks
from cmat_jax.envs.os_task import OSEnv, OSTask, load_os_tasks, os_metrics

__all__ = [
    "DBBenchEnv",
    "DBTask",
    "Env",
    "EnvError",
    "OSEnv",
    "OSTask",
    "StepResult",
    "counterfactual_step",
    "dbbench_metrics",
    "load_os_tasks",
    "load_tasks",
    "make_env",
    "os_metrics",
]
