"""Where a decode step's time goes: one `Generator.generate` call under the JAX profiler, its
XLA:CPU ops grouped by (kind, result shape, source op) and reported per decode step.

SmolLM2-135M shapes, random init, bf16, batch 16, prompt 256, 128 new tokens (as
`tools/bench_generate.py`). The XLA ops are named by joining the trace with the optimized HLO
of the decode program (dumped to a temporary folder). Times include the profiler's overhead
(a traced call runs ~10% slower); compare groups, not totals across runs.

    python tools/profile_generate.py [--batch 16 --prompt 256 --new 128 --top 25]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="profile_generate_"))
    # Must be set before jax starts: per-op trace events and the decode program's HLO.
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_cpu_enable_xprof_traceme=true",
            f"--xla_dump_to={work / 'hlo'}",
            "--xla_dump_hlo_as_text",
            "--xla_dump_hlo_module_re=.*decode.*",
        ]
    )
    import jax
    import numpy as np
    from bench_generate import build_models

    from cmat_jax.inference.generate import Generator

    model, _ = build_models(real=False, with_peer=False)
    gen = Generator(model, cache_dtype="bfloat16")
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (args.batch, args.prompt))
    prompts = ids.tolist()
    gen.generate(prompts, max_new_tokens=args.new, eos_ids=[])  # compile
    jax.profiler.start_trace(str(work / "trace"), create_perfetto_trace=True)
    gen.generate(prompts, max_new_tokens=args.new, eos_ids=[])
    jax.profiler.stop_trace()

    trace = next((work / "trace").rglob("*.trace.json.gz"))
    with gzip.open(trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    hlo = "\n".join(p.read_text() for p in (work / "hlo").glob("*decode*after_optimizations.txt"))
    ops = {}  # instruction name -> (result shape, the jax op it came from)
    for line in hlo.splitlines():
        m = re.match(r"\s*%(\S+) = (\S+) ", line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), src.group(1) if src else "")

    total_us: collections.Counter[tuple[str, str, str]] = collections.Counter()
    calls: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for e in events:
        if e["name"] not in ops:
            continue  # host-side events (Python, executor waits) and the prefill program
        shape, source = ops[e["name"]]
        source = re.sub(r"^jit\(_decode_impl\)/while/body/(closed_call/)?", "", source)
        key = (re.sub(r"\.\d+$", "", e["name"]), shape.split("{")[0], source)
        total_us[key] += e["dur"]
        calls[key] += 1

    steps = args.new - 1
    rows = []
    print(f"{'ms/step':>8} {'calls/step':>10}  op  result  source", file=sys.stderr)
    for key, us in total_us.most_common(args.top):
        ms = us / 1e3 / steps
        rows.append(dict(op=key[0], shape=key[1], source=key[2], ms_per_step=round(ms, 3)))
        print(f"{ms:8.3f} {calls[key] / steps:10.1f}  {'  '.join(key)}", file=sys.stderr)
    summed = sum(total_us.values()) / 1e3 / steps
    # Ops run on two threads at times, so the sum can exceed the step's wall time.
    print(json.dumps(dict(decode_steps=steps, op_ms_per_step_summed=round(summed, 2), top=rows)))


if __name__ == "__main__":
    main()
