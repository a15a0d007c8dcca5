"""Fine-tuning with and without ToE on a task the demo never saw: the digits under a fixed shift.

    python -m bench.finetune                 # pretrain, then 2 methods x (ToE, full tokens) x 3 seeds
    python -m bench.finetune --epochs 3 --seeds 0 --out /tmp/ft   # a smoke run
    python -m bench.finetune --methods vpt --threads 1              # one method; once the pretraining
                                                                    # is done, two can run at once

1. Pretraining: the DeiT demo recipe (``ToE/deit/configs/demo.yaml``, seed 0) on the plain digits,
   once; its ``checkpoint.pth`` is kept in ``--work`` and reused (continued if it was interrupted).
2. The task: ``data/digits-shift`` (``python -m ToE.common.digits --shift``: every digit turned a
   quarter, in inverted colours, blue-tinted), the same 10 classes under a shift the demo never saw.
3. Each method is ``bench.accuracy`` on that folder with ``--finetune CHECKPOINT`` (and ``--vpt``):
   the configurations ``full`` (full tokens) and ``deit-uniform`` (the demo's ToE schedule) with
   every seed, interleaved, each ToE run paired with the full-token run of its seed. Full
   fine-tuning trains everything at ``--lr-full``; deep VPT (``--prompt-tokens`` prompts per
   block) trains the prompts and the head at ``--lr-vpt``. Tables: ``OUT/finetune_full/`` and
   ``OUT/finetune_vpt/`` (``accuracy.md``), written by ``bench.accuracy``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from bench import accuracy
from bench.common import run_trainer, trainer_command
from ToE.common.digits import build_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIFTED = os.path.join(ROOT, "data", "digits-shift")


def pretrain(work: str, epochs: Optional[int]) -> str:
    """The DeiT demo's checkpoint, trained into ``work/pretrain``: with ``--auto-resume``, so an
    interrupted pretraining continues and a finished one is reused (the trainer returns at once)."""
    out = os.path.join(work, "pretrain")
    build_digits(accuracy.DIGITS, size=32)
    length = ["--epochs", epochs] if epochs else []
    run_trainer(trainer_command("deit", None, "--data-path", accuracy.DIGITS, "--output_dir", out, "--auto-resume",
                                *length), out)
    return os.path.join(out, "checkpoint.pth")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs per run (default: 15)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="(default: the demo recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-full", type=float, default=5e-4, help="lr of full fine-tuning (default: 5e-4)")
    parser.add_argument("--lr-vpt", type=float, default=5e-3, help="lr of VPT (default: 5e-3)")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="VPT prompts per block (default: 10)")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "finetune"), help="folder of the runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder of the tables")
    parser.add_argument("--methods", nargs="+", choices=["full", "vpt"], default=["full", "vpt"],
                        help="which fine-tuning methods to run (default: both)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each training run (default: 2)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already done")
    args = parser.parse_args(argv)
    checkpoint = pretrain(args.work, args.pretrain_epochs)
    build_digits(SHIFTED, size=32, shift=True)
    methods = {"full": (args.lr_full, []),
               "vpt": (args.lr_vpt, ["--vpt", "deep", "--prompt-tokens", str(args.prompt_tokens)])}
    for method in args.methods:
        lr, flags = methods[method]
        accuracy.main(["--configs", "full", "deit-uniform", "--epochs", str(args.epochs),
                       "--threads", str(args.threads), "--seeds", *map(str, args.seeds), "--lr", str(lr),
                       "--data-path", SHIFTED,
                       "--work-dir", os.path.join(args.work, method),
                       "--out", os.path.join(args.out, f"finetune_{method}"),
                       *(["--resume"] if args.resume else []), "--trainer-args", "--finetune", checkpoint, *flags])


if __name__ == "__main__":
    main()
