"""``python -m bench``: run every group, print one table, write ``bench/results.json``.

Groups run one after another (never in parallel: they would measure each other), each
inside try/except so that one broken group reports an honest MISS row instead of hiding
the others. Every process a group starts is reaped when it ends, and again at exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.common import REPO, Row, reap_all, render_table, write_results

#: Group name -> module (each has ``run(quick: bool, ...) -> list[Row]``), in run order.
GROUPS = {
    "emit": "bench.emit",
    "throughput": "bench.throughput",
    "daemon_cpu": "bench.daemon_cpu",
    "latency": "bench.latency",
    "gradients": "bench.gradients",
    "training": "bench.training",
    "cleanrl": "bench.cleanrl",
    "sb3": "bench.sb3",
    "monitor": "bench.monitor",
    "memory": "bench.memory",
    "fleet": "bench.fleet",
    "web": "bench.web",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure every DESIGN.md performance target against its baseline "
                    "in the same run; print one table and write bench/results.json.")
    parser.add_argument("--only", metavar="GROUPS",
                        help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and shorter runs (development; numbers are rough)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json",
                        help="where to write the JSON rows (default bench/results.json)")
    parser.add_argument("--no-learn", action="store_true",
                        help="skip 'updates to reach mean return 195' (the training group's "
                             "slowest row, up to 150 PPO updates)")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in GROUPS]
        if unknown:
            parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
        args.groups = [g for g in GROUPS if g in wanted]
    else:
        args.groups = list(GROUPS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for group in args.groups:
        t0 = time.perf_counter()
        print(f"[bench] {group} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(GROUPS[group])
            kwargs = {"learn": not args.no_learn} if group == "training" else {}
            rows.extend(module.run(quick=args.quick, **kwargs))
        except KeyboardInterrupt:
            reap_all()
            raise
        except Exception as exc:  # one broken group must not hide the others
            traceback.print_exc()
            rows.append(Row(f"{group}: failed", None, "", target="runs", passed=False,
                            note=f"{type(exc).__name__}: {exc}"))
        finally:
            reap_all()
        timings[group] = time.perf_counter() - t0
        print(f"[bench] {group} done in {timings[group]:.1f}s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    print(render_table(rows))
    misses = sum(r.passed is False for r in rows)
    print(f"\n{len(rows)} rows, {misses} MISS; {total:.0f}s on {platform.node()} "
          f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}){' [--quick]' if args.quick else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
