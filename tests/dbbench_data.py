"""Where the tests find the AgentBench DB dev split: inside the repository (a fresh clone has
nothing beside it); see tests/data/agentbench_dbbench/README.md for its source and license."""

from __future__ import annotations

from pathlib import Path

DBBENCH_DEV = Path(__file__).resolve().parent / "data" / "agentbench_dbbench" / "dev.jsonl"
