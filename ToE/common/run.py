"""Pieces of a training run's skeleton that do not depend on the task (classification, detection):
opening the outputs, saving a checkpoint from every process's view, the RNG hand-over on resume,
and what an interruption leaves behind."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ToE.common.checkpoint import check_resume_args, load_checkpoint, save_checkpoint, seed_everything
from ToE.common.distributed import DistEnv, barrier
from ToE.common.log import RunLog, remove_run_outputs, save_args


def start_outputs(args: argparse.Namespace, env: DistEnv, first_epoch: int,
                  extra_args: Optional[Dict[str, Any]] = None) -> RunLog:
    """Say where the run writes (or that it writes nothing), clear an old run for ``--overwrite``,
    write args.yaml (with ``extra_args``), and open the log at ``first_epoch``."""
    if env.is_main:
        if not args.output_dir:
            print("note: no --output_dir: nothing will be saved (no checkpoints, no log). Pass --output_dir "
                  "to keep the run", flush=True)
        else:
            if args.overwrite and not args.resume:
                remove_run_outputs(args.output_dir)
            save_args({**vars(args), **(extra_args or {})}, args.output_dir)
    barrier()  # no process writes before the old run's files are gone
    return RunLog(args.output_dir, enabled=env.is_main, first_epoch=first_epoch)


def save_run_checkpoint(state: Dict[str, Any], output_dir: str, env: DistEnv, is_best: bool = False) -> str:
    """Write ``state`` (its ``rng`` holding this process's stream under its rank) as
    ``output_dir/checkpoint.pth`` (and ``best_checkpoint.pth``), with every process's RNG state
    gathered into the one file; returns the path. Call it on every process."""
    if env.distributed:
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, state["rng"][str(env.rank)])
        state["rng"] = {str(rank): rng for rank, rng in enumerate(gathered)}
    path = os.path.join(output_dir, "checkpoint.pth")
    if env.is_main:
        save_checkpoint(state, path)
        if is_best:
            save_checkpoint(state, os.path.join(output_dir, "best_checkpoint.pth"))
    barrier()
    return path


def rng_to_restore(checkpoint: Dict[str, Any], env: DistEnv, seed: int, start_epoch: int, path: str,
                   lr_note: str = "") -> Optional[Dict[str, Any]]:
    """This process's saved RNG state, or None after re-seeding when the process count changed
    (a fresh stream per process, distinct from every earlier epoch's; a warning says so)."""
    rng = checkpoint.get("rng", {})
    stored_world = int(checkpoint.get("world_size", len(rng) or 1))
    if stored_world == env.world_size and str(env.rank) in rng:
        return rng[str(env.rank)]
    seed_everything(seed + env.rank + 100_003 * start_epoch)
    if env.is_main:
        print(f"warning: {path} was written by {stored_world} process(es), this run has {env.world_size}: every "
              f"process starts a fresh random stream{lr_note}; the run continues, but not bit for bit as it would "
              "have", flush=True)
    return None


def open_resume(path: str, args: argparse.Namespace, model: torch.nn.Module, num_classes: int,
                must_match: Sequence[str], eval_keys: Sequence[str], misfit_fix: Tuple[str, str],
                classes_fix: str = "") -> Tuple[Dict[str, Any], Dict[str, Any], int]:
    """Load ``path`` for ``--resume`` (or ``--eval``) into ``model``; return (checkpoint, its args,
    its epoch). Refused by name, with the fix: flags that must match (``must_match``, or only
    ``eval_keys`` for --eval), another class count (``num_classes`` of the file, else the rows of its ``head.weight``),
    and weights that do not fit the model (``misfit_fix``: what the model is, which flags to pass)."""
    from ToE.common.errors import UserError

    checkpoint = load_checkpoint(path)
    stored = checkpoint.get("args") or {}
    check_resume_args(path, stored, vars(args), eval_keys if args.eval else must_match)
    head = checkpoint.get("model", {}).get("head.weight")
    stored_classes = checkpoint.get("num_classes", head.shape[0] if torch.is_tensor(head) else None)
    if stored_classes is not None and stored_classes != num_classes:
        raise UserError(f"resume file {path} has {stored_classes} classes, the data in {args.data_path} has "
                        f"{num_classes}. Resume with the data set it was trained on{classes_fix}")
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise UserError(f"resume file {path} does not fit {misfit_fix[0]} ({error.__class__.__name__}). "
                        f"{misfit_fix[1]}") from None
    return checkpoint, stored, int(checkpoint.get("epoch", 0))


def check_resume_epochs(path: str, args: argparse.Namespace, stored: Dict[str, Any], start_epoch: int,
                        may_extend: bool) -> bool:
    """The epoch arithmetic of a resume: True when the run is already finished and ``--auto-resume``
    asks for it (nothing to do, not an error); a finished run otherwise, or an ``--epochs`` that bends
    the schedule (any change, or a shorter one when ``may_extend``), is refused with the fix."""
    from ToE.common.errors import UserError

    planned = int(stored.get("epochs", args.epochs))
    if start_epoch >= args.epochs and args.auto_resume:
        return True
    if start_epoch >= args.epochs:
        raise UserError(f"resume file {path} is a finished run: it trained {start_epoch} epochs and --epochs "
                        f"is {args.epochs}. Raise --epochs to train longer, or evaluate it with --eval")
    if args.epochs < planned or (args.epochs != planned and not may_extend):
        raise UserError(f"resume file {path} was trained with --epochs {planned}, this run gives --epochs "
                        f"{args.epochs}: that would bend its learning-rate schedule. Resume with --epochs "
                        f"{planned} (to stop earlier, add --stop-after-epochs N)")
    return False


def auto_resume_path(args: argparse.Namespace) -> str:
    """``--auto-resume``: OUTPUT/checkpoint.pth when it exists (continue the run), else "" (start)."""
    from ToE.common.errors import UserError

    if args.resume:
        raise UserError("--auto-resume picks OUTPUT/checkpoint.pth itself: pass either it or --resume FILE")
    if not args.output_dir:
        raise UserError("--auto-resume needs --output_dir (it continues OUTPUT/checkpoint.pth when it exists)")
    candidate = os.path.join(args.output_dir, "checkpoint.pth")
    return candidate if os.path.isfile(candidate) else ""


def interrupted_message(output_dir: str, last_checkpoint: Optional[str]) -> str:
    """What an interruption (Ctrl-C) leaves: nothing, no checkpoint yet, or the one to resume from."""
    if not output_dir:
        return "nothing was saved (no --output_dir)"
    if last_checkpoint is None:
        return "stopped before the end of the first epoch: no checkpoint was written, nothing to resume"
    return f"{last_checkpoint} (the last finished epoch) is intact; continue with --resume {last_checkpoint}"
