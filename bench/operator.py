"""The ToE operator alone: forward + backward time of ``token_select.TokenSelect`` in stage 1.

    python -m bench.operator                  # the demo shape and deit_small's, 2 threads

Random tokens of the shape the operator sees after block 0, (batch, 1 + patches, channels),
the DeiT schedule in its first stage (half the patch tokens kept). Prints the median over
``--repeats`` timings of ``--loops`` forward + backward passes each. It times whatever
``token_select`` is on the path, so running it at two commits compares two versions of the
operator; ``bench.speed`` gives its share of a whole training step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import torch

import token_select

SHAPES = {"demo": (64, 65, 96), "deit_tiny": (32, 197, 192), "deit_small": (32, 197, 384)}


def time_operator(shape: Sequence[int], loops: int, repeats: int) -> float:
    """Median seconds of one forward + backward of the stage-1 operator on random tokens."""
    operator = token_select.TokenSelect([0, 100, 200], [0.5, 0.75, 1.0], 0.25, 2).train()
    operator.update_current_stage(0)
    tokens = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    upstream = torch.ones_like(operator(tokens)[0])

    def step() -> None:
        out, _ = operator(tokens)
        out.backward(upstream)

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            step()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["demo", "deit_small"], choices=sorted(SHAPES))
    parser.add_argument("--loops", type=int, default=20, help="forward + backward passes per timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings; the median is printed")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.shapes:
        seconds = time_operator(SHAPES[name], args.loops, args.repeats)
        print(f"{name} {tuple(SHAPES[name])}: {seconds * 1e3:.2f} ms forward + backward (stage 1)")


if __name__ == "__main__":
    main()
