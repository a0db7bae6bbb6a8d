"""Seeded comparison: CMAT rounds vs an equal-compute continuation of agent tuning (issue 26).

    python tools/compare_arms.py --out runs/compare [--seeds 3] [--limit 20 | --sample 30] \
        [--checkpoint RUN_DIR] [--dev-data FILE] [CMAT JOB FLAGS, e.g. --preset cmat-full]

Any flag this tool does not own is a flag of `python -m cmat_jax.train cmat` (default preset:
cmat-default). Without --checkpoint the job's agent tuning runs once into OUT/agent_tuning;
then, per seed, arm `cmat` runs the job's CMAT rounds and arm `sft` as many optimizer steps of
the same shape on fresh expert rows (`cmat_jax.cmat.compare`). Both are evaluated on the dev
split (default: the in-repo tests/data/agentbench_dbbench/dev.jsonl) and on the job's held-out
synthetic tasks. Prints per-arm mean / sd and paired tests, writes OUT/compare.json and
OUT/compare.png; the last line is one JSON with `ratio` = mean cmat / mean sft dev score.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tyro

from cmat_jax.cli import run_cli
from cmat_jax.cmat.compare import CompareConfig, run_compare
from cmat_jax.cmat.job import CMATJob
from cmat_jax.train import flag_value, preset_default

REPO = Path(__file__).resolve().parents[1]
DEV_DEFAULT = REPO / "tests" / "data" / "agentbench_dbbench" / "dev.jsonl"
DEFAULT_PRESET = "cmat-default"


def parse(argv: list[str]) -> CompareConfig:
    ap = argparse.ArgumentParser(
        prog="tools/compare_arms.py",
        description="CMAT rounds vs equal-compute agent tuning over N seeds; other flags are "
        "`python -m cmat_jax.train cmat` flags.",
    )
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--checkpoint", help="CMAT run dir holding the job's agent-tuning checkpoint")
    ap.add_argument("--dev-data", default=str(DEV_DEFAULT), help="AgentBench DB JSONL ('' = none)")
    ap.add_argument("--limit", type=int, help="first N dev items (default: all)")
    ap.add_argument(
        "--sample", type=int, help="N dev items drawn in proportion to their query types"
    )
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of --sample (default 0)")
    args, rest = ap.parse_known_args(argv)
    for owned in ("--dev-limit", "--resume"):
        if flag_value(rest, owned) is not None or owned in rest:
            raise ValueError(f"{owned} is not a flag of tools/compare_arms.py (see --help)")
    if flag_value(rest, "--preset") is None:
        rest = ["--preset", DEFAULT_PRESET, *rest]
    job = tyro.cli(
        CMATJob, args=rest, default=preset_default(CMATJob, rest), prog="tools/compare_arms.py"
    )
    return CompareConfig(
        job=job,
        out=Path(args.out).expanduser().resolve(),
        seeds=args.seeds,
        checkpoint=Path(args.checkpoint).expanduser().resolve() if args.checkpoint else None,
        dev_data=Path(args.dev_data).expanduser().resolve() if args.dev_data else None,
        dev_limit=args.limit,
        dev_sample=args.sample,
        dev_sample_seed=args.sample_seed,
    )


def report_lines(out: dict) -> list[str]:
    """Per score: each arm's mean +- sd over seeds, the mean difference and the paired tests."""
    lines = [f"{len(out['seeds'])} seeds {out['seeds']}; paired by seed (cmat - sft):"]
    for name, st in out["stats"].items():
        t = st["paired_t"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        lines.append(
            f"{name:18s} cmat {st['a']['mean']:.3f} +- {st['a']['sd']:.3f}   "
            f"sft {st['b']['mean']:.3f} +- {st['b']['sd']:.3f}   "
            f"diff {st['diff']['mean']:+.3f} +- {st['diff']['sd']:.3f}   "
            f"t={fmt(t['t'])} df={t['df']} p={fmt(t['p'])}   "
            f"sign-flip p={fmt(st['sign_flip_p'])}   sign-test p={fmt(st['sign_test_p'])}"
        )
    steps = {arm: [r["steps"] for r in out["runs"][arm]] for arm in out["runs"]}
    lines.append(f"optimizer steps per seed: {steps}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(list(sys.argv[1:] if argv is None else argv))
    out = run_compare(cfg)
    for line in report_lines(out):
        print(line)
    print(f"wrote {cfg.out / 'compare.json'} and {out['plot']}")
    head = "dev" if "dev" in out["stats"] else "synthetic"
    st = out["stats"][head]
    cmat, sft = st["a"]["mean"], st["b"]["mean"]
    last = {
        "metric": head,
        "seeds": len(out["seeds"]),
        "cmat_mean": round(cmat, 4),
        "sft_mean": round(sft, 4),
        "ratio": round(cmat / sft, 4) if sft else None,
        "diff_mean": round(st["diff"]["mean"], 4),
        "paired_t_p": st["paired_t"]["p"],
        "sign_flip_p": st["sign_flip_p"],
    }
    print(json.dumps(last))
    return out


if __name__ == "__main__":
    run_cli(main)
