"""The one run lifecycle of every trainer: ``Run(args, Task).fit()``.

The run owns what does not depend on the task: the resolved configuration and its identity for
resume, the output folder and its protection, (auto-)resume, the RNG hand-over, preemption and the
time limit (every stop decision agreed by all processes), atomic checkpoints with the position
inside the epoch, logs, AMP and the GradScaler, the DDP wrap, the EMA, gradient accumulation and
the epoch loop. In order:

    flags -> ToE operator -> output folder -> resume file (flags that must match) -> processes
    -> task (model, data, loss, optimizer) -> resume state -> for each epoch:
         plan = task.plan[epoch]; ToE stage from the epoch; train (stop checks); evaluate; log; checkpoint

Entry: each trainer's ``main.py`` calls ``trainer_entry`` (below) with its flags and its task class;
``main`` builds the ``RunContext`` (flags checked, processes, device, precision, operator), the task
from it, and runs. A task subclasses ``Task`` (below) and holds what is its own (classification:
``ToE/common/classification.py``, detection: ``ToE/yolos/trainer.py``); ``Task`` lists what it
provides. The training step is the task's: ``train_step`` (forward and loss) and
``before_optimizer_step`` (between backward and the optimizer step: clipping by default); the run
keeps accumulation, AMP, DDP, the EMA and the stop checks around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ToE.common.args import NOT_IDENTITY, TOE_KEYS, OneLineParser, build_token_select
from ToE.common.checkpoint import (check_resume_args, frozen_checksum, frozen_matches, load_checkpoint, rng_state,
                                   save_checkpoint, saved_state, seed_everything, set_rng_state, trained_state)
from ToE.common.distributed import (DistEnv, all_reduce_sum, autocast, barrier, cleanup, device_note, gather_ints,
                                    init_distributed, resolve_amp_dtype, resolve_device)
from ToE.common.errors import Preempted, TrainingInterrupted, TrainingStopped, UserError, WriteFailed
from ToE.common.lock import OutputLock
from ToE.common.log import (RunLog, check_no_other_run, check_output_dir, console_line, remove_run_outputs,
                            save_args)
from ToE.common.preemption import StopSignal, StopWatch, agreed_reason
from ToE.common.pretrained import check_resumable, misfit
from ToE.common.schedule import EpochPlan

def compiled(model: torch.nn.Module, backend: str, plan, toe) -> torch.nn.Module:
    """``--torchcompile BACKEND``: the training forward compiled whole (dynamo, ``dynamic=False``).

    Whole, not per block: ToE's operator sits between block 0 and block 1, so a per-block compile
    would leave it eager and its gathers unfused; within a ToE stage every shape is constant, so
    the whole model is one graph per stage (a curriculum adds one per resolution and batch). The
    module itself is not replaced: its state_dict keys, the EMA copy, the checkpoints and the
    evaluation (all tokens, eager) are what they are without compile. Dynamo's recompile limit is
    raised to the number of distinct (stage, input, batch) the plan holds, so no stage falls back
    to eager silently. Under DDP the compiled module is wrapped (compile, then DDP): one graph per
    stage on any number of processes; the gradient all-reduce then follows the backward instead of
    overlapping it."""
    import torch._dynamo

    from token_select import stage_of_epoch

    shapes = {(stage_of_epoch(epoch, toe.expansion_step), epoch_plan.crop, epoch_plan.batch)
              for epoch, epoch_plan in enumerate(plan)}

    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < len(shapes) + 2:
        torch._dynamo.config.recompile_limit = len(shapes) + 2
    return torch.compile(model, backend=backend, dynamic=False)


def compiled_graphs() -> int:
    """The graphs dynamo has compiled in this process so far (torch's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def trainer_entry(description: str, get_args_parser: Callable[[], argparse.ArgumentParser], task: str):
    """The ``parse_args``, ``main`` and ``cli`` of a trainer's main.py.

    ``task`` ("module:Class") is imported when ``main`` runs, so ``--help`` and flag errors stay
    quick; ``main`` runs it on the one lifecycle (``Run``). ``cli`` turns user errors into one line
    and exit code 2 (``errors.run_main``)."""

    def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
        from ToE.common.config import add_config_arg, parse_with_config

        parser = OneLineParser(description, parents=[get_args_parser()])
        add_config_arg(parser)
        return parse_with_config(parser, argv)

    def main(args: argparse.Namespace) -> None:
        module, name = task.split(":")
        Run(args, getattr(importlib.import_module(module), name)).fit()

    def cli(argv: Optional[Sequence[str]] = None) -> None:
        from ToE.common.errors import run_main

        run_main(lambda: main(parse_args(argv)))

    return parse_args, main, cli


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a task is built from, finished before it: the processes and the device, the precision
    the step computes in (None: float32) and the ToE operator (not yet attached)."""

    env: DistEnv
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    toe: Any


class Task:
    """What a trainer provides to the run. A subclass sets, in ``__init__(args, context)``:
    ``model`` (operator attached, on the device), ``optimizer``, ``lr_scheduler`` (a timm scheduler
    or None), ``updates_per_epoch`` (None: the lr steps per epoch), ``plan`` (``plan[epoch]`` is an
    ``EpochPlan``; ``plan.epochs``, ``plan.per_update``, ``plan.identity``: derived values stored with
    the run, checked on resume), ``num_classes``, ``ema_decay`` (None: no EMA), and provides:

        train_loader(epoch, plan, skip)   the epoch's batches without its first ``skip``
        train_step(model, batch)          forward and loss: (loss, metrics {name: per-image mean}, images)
        evaluate(model)                   stats {"loss", best_metric, "images", ...}, alike on every process
        evaluate_only(model), describe(), outputs_info()

    The defaults below are what every trainer shares; a trainer overrides what is its own."""

    best_metric = "acc1"  # the evaluation key that makes best_checkpoint.pth
    weights_must_match: Tuple[str, ...] = ()  # flags --eval must share (they shape the weights)
    misfit = ("the model", "Resume with the flags it was trained with")  # (what, which flags) when weights misfit
    clip_grad: Optional[float] = None  # the gradient norm before_optimizer_step clips to (None: no clipping)
    # evaluation stats shown by name on the epoch's console line besides eval_text's words (e.g. "test_f1");
    # every other number of the epoch's record that is not the run's own is shown there anyway
    console_metrics: Tuple[str, ...] = ()

    @staticmethod
    def check_flags(args: argparse.Namespace) -> List[str]:
        """Cross-flag checks before any work (raise UserError); returns warnings."""
        return []

    def before_optimizer_step(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """Between the backward of an update's last micro-batch (gradients unscaled) and the optimizer
        step: clip the gradient norm to ``clip_grad``. Returns the norm before clipping (a device
        tensor: no host sync), or None when it was not computed (the run computes it to log it)."""
        if self.clip_grad:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
        return None

    def eval_text(self, stats: Dict[str, float]) -> str:
        """The evaluation on the epoch's console line."""
        return f"{self.best_metric} {stats[self.best_metric]:.4g}"


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """The total L2 norm of the model's gradients (a device tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch 2.6+: foreach kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def keep_history(output_dir: str, epoch: int, keep: int) -> None:
    """``--checkpoint-hist N`` (timm's name): checkpoint-EPOCH.pth beside checkpoint.pth for the last N
    epochs, older ones removed. A hard link where the file system has them (no copy: checkpoint.pth is
    replaced by a new file, never rewritten in place), else a copy."""
    source = os.path.join(output_dir, "checkpoint.pth")
    target = os.path.join(output_dir, f"checkpoint-{epoch}.pth")
    if os.path.exists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)
    for old in sorted(history_epochs(output_dir))[:-keep]:
        os.remove(os.path.join(output_dir, f"checkpoint-{old}.pth"))


def history_epochs(output_dir: str) -> List[int]:
    """The epochs of the checkpoint-EPOCH.pth files in ``output_dir``."""
    import re

    found = (re.fullmatch(r"checkpoint-(\d+)\.pth", name) for name in os.listdir(output_dir))
    return [int(match.group(1)) for match in found if match]


def auto_resume_path(args: argparse.Namespace) -> str:
    """``--auto-resume``: OUTPUT/checkpoint.pth when it exists (continue the run), else "" (start)."""
    if args.resume:
        raise UserError("--auto-resume picks OUTPUT/checkpoint.pth itself: pass either it or --resume FILE")
    if not args.output_dir:
        raise UserError("--auto-resume needs --output_dir (it continues OUTPUT/checkpoint.pth when it exists)")
    candidate = os.path.join(args.output_dir, "checkpoint.pth")
    return candidate if os.path.isfile(candidate) else ""


def _whole(value: float):
    """``value`` as an int when it is one (a constant token count logs as 48, not 48.0)."""
    return int(value) if float(value).is_integer() else value


class Run:
    """One training (or ``--eval``) run of ``task_class`` from the parsed flags ``args`` (never mutated)."""

    def __init__(self, args: argparse.Namespace, task_class) -> None:
        self.args = args
        self.resume_path = args.resume  # until the set-up picks --auto-resume's file
        # one writer per output folder: the set-up takes the lock; a run refused during it gives it back
        self.output_lock = OutputLock("" if args.eval else args.output_dir)
        self.watch = StopWatch(args.time_limit)
        self.stop_reason: Optional[str] = None  # why the processes agreed to stop (_agreed_stop)
        # A stop signal or Ctrl-C while the run sets up (data, labels, model, resume file) ends it at
        # once, in one line that says what the output folder holds; once training runs, a signal is
        # acted on at the next stop check (with a checkpoint) instead.
        try:
            with self.output_lock.released_on_error(), StopWatch.at_once():
                self._set_up(task_class)
        except StopSignal as stop:
            raise Preempted(f"{stop} {self._before()}; {self._saved_message()}") from None
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"{self._before()}; {self._saved_message()}") from None

    def _before(self) -> str:
        return "before the evaluation started" if self.args.eval else "before training started"

    def _set_up(self, task_class) -> None:
        args = self.args
        # Flag mistakes fail first, before any data, model or output is touched.
        self.toe = build_token_select(args)
        warnings = task_class.check_flags(args)
        if args.output_dir:
            check_output_dir(args.output_dir)
        # the writing process holds the folder's lock from here to the end, before it reads what the folder
        # holds (--auto-resume's checkpoint); --check-only only looks, --eval writes no run (no lock)
        if args.check_only:
            self.output_lock.check()
        else:
            self.output_lock.claim()
        self.resume_path = auto_resume_path(args) if args.auto_resume and not args.eval else args.resume
        if args.output_dir and not args.eval:
            check_no_other_run(args.output_dir, self.resume_path, args.overwrite)
        checkpoint: Dict[str, Any] = {}
        stored: Dict[str, Any] = {}
        if self.resume_path:
            # pretrained weights are no run to continue: --eval evaluates them, training points to --finetune
            checkpoint = check_resumable(self.resume_path, load_checkpoint(self.resume_path), args)
            stored = checkpoint.get("args") or {}
            keys = task_class.weights_must_match if args.eval else [k for k in vars(args) if k not in NOT_IDENTITY]
            check_resume_args(self.resume_path, stored, vars(args), keys)
            if args.eval and all(key in stored for key in TOE_KEYS[:5]):
                # --eval --sparse-eval reduces as the checkpoint's own schedule did in its last epoch
                # (a checkpoint from before a switch existed trained with its default)
                self.toe = build_token_select(argparse.Namespace(**{**vars(args),
                                                                    **{k: stored[k] for k in TOE_KEYS if k in stored}}))
            if not args.eval and args.global_batch is None and stored.get("global_batch"):
                # a resumed run keeps its images per update on any number of processes (accumulation
                # makes up the difference); an explicit --global-batch is checked against it in _resume
                args = self.args = argparse.Namespace(**{**vars(args), "global_batch": int(stored["global_batch"])})
        self.env = init_distributed("cpu" if args.check_only else args.device)
        self.device = self.env.device
        self.device_note = device_note(args.device, self.device)  # why this device, for the start line
        # --check-only runs on the CPU, but checks the precision of the device the run will use
        # (and refuses --device cuda without a usable GPU, as the run would)
        planned = resolve_device(args.device) if args.check_only else self.device
        self.amp_dtype = resolve_amp_dtype(args.amp_dtype, planned if args.check_only else self.device)
        if self.env.is_main:
            for warning in warnings:
                print(f"warning: {warning}", flush=True)
        seed_everything(args.seed + self.env.rank)

        self.task = task_class(args, RunContext(self.env, self.device, self.amp_dtype, self.toe))
        task = self.task
        self.epochs = task.plan.epochs
        # the resolved configuration: the flags and what the run derived from them (args.yaml, resume identity)
        # (the flags as given, so that "-c OUT/args.yaml" runs it again; derived values beside them)
        first = self.first_plan = task.plan[0]
        self.global_batch = task.plan.global_batch(self.env.world_size)  # images per optimizer update
        self.derived = {"run_epochs": self.epochs, "accumulation": first.accum, **task.plan.identity}
        # args.yaml records the global batch the run trains with, whether a flag, a recipe or the
        # per-process batch x processes gave it: "-c OUT/args.yaml" reruns it on any number of processes
        self.config = {**vars(args), "global_batch": self.global_batch, "resume": self.resume_path, **self.derived}
        model = task.model
        self.model = model
        self.compiled = bool(getattr(args, "torchcompile", None)) and not args.eval
        if self.compiled:
            self.model = compiled(model, args.torchcompile, task.plan, self.toe)
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.model_ema = self._new_ema() if task.ema_decay is not None else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch = args.start_epoch
        self.best = 0.0
        self.position: Optional[Dict[str, Any]] = None  # where inside an epoch a preempted run stopped
        self.rng: Optional[Dict[str, Any]] = None  # this process's RNG state to restore on resume
        self.finished = False  # --auto-resume found a run that has trained all its epochs
        self.images_trained = 0  # images trained over all processes so far (resumed from the checkpoint)
        self.log: Optional[RunLog] = None  # opened in fit(), once the outputs are set up
        if self.resume_path:
            self._resume(checkpoint, stored)
        del checkpoint  # the loaded tensors are not kept beyond set-up
        if not args.eval:
            self._agree_on_start()

    # -- set-up ------------------------------------------------------------------------------------
    def _new_ema(self):
        """An EMA copy of the current weights (operator included, so --sparse-eval follows it)."""
        from timm.utils import ModelEmaV3  # here: --help and flag errors do not import timm

        return ModelEmaV3(self.task.model, decay=self.task.ema_decay, device=self.device)

    def _resume(self, checkpoint: Dict[str, Any], stored: Dict[str, Any]) -> None:
        """Continue (or, with --eval, evaluate) the checkpoint; misfits are refused by name."""
        args, env, task, path = self.args, self.env, self.task, self.resume_path
        head = checkpoint.get("model", {}).get("head.weight")
        stored_classes = checkpoint.get("num_classes", head.shape[0] if torch.is_tensor(head) else None)
        if stored_classes is not None and stored_classes != task.num_classes:
            raise UserError(f"resume file {path} has {stored_classes} classes, the data in {args.data_path} has "
                            f"{task.num_classes}. Resume with the data set it was trained on")
        frozen = {name for name, parameter in task.model.named_parameters() if not parameter.requires_grad}
        # what does not fit, by name (frozen weights, VPT's backbone, come from --finetune, not from the file)
        own, weights = task.model.state_dict(), checkpoint["model"]
        problem = misfit(sorted(set(own) - set(weights) - frozen), sorted(set(weights) - set(own)),
                         sorted(key for key in set(own) & set(weights) if own[key].shape != weights[key].shape))
        if problem:
            raise UserError(f"resume file {path} does not fit {task.misfit[0]} ({problem}). {task.misfit[1]}")
        task.model.load_state_dict(weights, strict=False)
        if frozen and not frozen_matches(checkpoint.get("frozen_checksum"), task.model):
            raise UserError(f"resume file {path} was tuned on other frozen weights than those of --finetune "
                            f"{getattr(args, 'finetune', '')}. Pass the backbone it was tuned from")
        epoch = int(checkpoint.get("epoch", 0))
        if args.eval:
            self.toe.update_current_stage(epoch)
            return
        if stored.get("global_batch") not in (None, self.global_batch):
            raise UserError(f"resume file {path} was trained with --global-batch {stored['global_batch']} (images per "
                            f"update), this run gives {self.global_batch}. Resume with --global-batch "
                            f"{stored['global_batch']}, or start a new run")
        for key, value in task.plan.identity.items():  # what the run derived (e.g. a curriculum) must match too
            if key in stored and stored[key] != value:
                raise UserError(f"resume file {path} was trained with {key} {stored[key]}, this run plans {value}. "
                                "Resume with the flags it was trained with, or start a new run")
        position = checkpoint.get("position")
        start = int(position["epoch"]) if position is not None else epoch + 1
        self.start_epoch = start
        self.position = dict(position) if position is not None else None
        planned = int(stored.get("run_epochs", stored.get("epochs", self.epochs)))
        if start >= self.epochs:
            if args.auto_resume:
                self.finished = True  # re-submitting a finished job is not an error
                return
            raise UserError(f"resume file {path} is a finished run: it trained {start} epochs and --epochs is "
                            f"{self.epochs}. Raise --epochs to train longer, or evaluate it with --eval")
        if self.epochs < planned:
            raise UserError(f"resume file {path} was trained with --epochs {planned}, this run gives --epochs "
                            f"{self.epochs}: that would bend its learning-rate schedule. Resume with --epochs "
                            f"{planned} (to stop earlier, add --stop-after-epochs N)")
        if self.epochs > planned and env.is_main:
            print(f"extending the run from {planned} to {self.epochs} epochs: the learning-rate schedule now spans "
                  f"{self.epochs} epochs and continues from epoch {start}", flush=True)
        task.optimizer.load_state_dict(checkpoint["optimizer"])
        self._load_scaler(checkpoint.get("scaler"), stored)
        if self.model_ema is not None:
            if checkpoint.get("model_ema") is not None:
                self.model_ema.module.load_state_dict(checkpoint["model_ema"])
            else:  # none stored: start the average from the loaded weights, not the random init
                self.model_ema = self._new_ema()
                if env.is_main:
                    print(f"note: {path} holds no EMA weights; the EMA starts from its model weights", flush=True)
        self.best = float(checkpoint.get(f"best_{task.best_metric}", 0.0))
        self.images_trained = int(checkpoint.get("images_trained", 0))
        self.rng = self._rng_to_restore(checkpoint, path)

    def _load_scaler(self, state: Optional[Dict[str, Any]], stored: Dict[str, Any]) -> None:
        """The GradScaler of the checkpoint; a checkpoint of another precision (bf16, fp32: no scale
        state) gives an fp16 run a fresh scaler, and an fp16 scale is dropped by a bf16/fp32 run."""
        if not self.scaler.is_enabled():
            return
        if state:
            self.scaler.load_state_dict(state)
        elif self.env.is_main:
            print(f"note: the checkpoint was trained with --amp-dtype {stored.get('amp_dtype', '?')}; float16 "
                  "starts a fresh loss scale", flush=True)

    def _agree_on_start(self) -> None:
        """Every process must resume where rank 0 does: a node that found another checkpoint, or
        none (a node-local --output_dir), is refused in one line instead of training out of step."""
        if not self.env.distributed:
            return
        step = self._resume_step()
        places = gather_ints([self.start_epoch, step, int(self.finished)], self.env)
        if any(place != places[0] for place in places):
            raise UserError(f"the processes found different checkpoints to resume (epoch, step, finished per rank: "
                            f"{places}): --output_dir must be one folder that every node sees (a shared file system)")

    def _rng_to_restore(self, checkpoint: Dict[str, Any], path: str) -> Optional[Dict[str, Any]]:
        """This process's saved RNG state, or None after re-seeding when the process count changed
        (a fresh stream per process, distinct from every earlier epoch's; a warning says so)."""
        env = self.env
        rng = checkpoint.get("rng", {})
        stored_world = int(checkpoint.get("world_size", len(rng) or 1))
        if stored_world == env.world_size and str(env.rank) in rng:
            return rng[str(env.rank)]
        seed_everything(self.args.seed + env.rank + 100_003 * self.start_epoch)
        if env.is_main:
            print(f"warning: {path} was written by {stored_world} process(es), this run has {env.world_size}: every "
                  f"process starts a fresh random stream (the {self.global_batch} images per update are kept); the "
                  "run continues, "
                  "but not bit for bit as it would have", flush=True)
        return None

    # -- the run -----------------------------------------------------------------------------------
    def fit(self) -> None:
        args, env, task = self.args, self.env, self.task
        try:
            if args.check_only:
                if env.is_main:
                    print(f"check passed: flags, data in {args.data_path}, output folder {args.output_dir or '(none)'}"
                          + (f", resume file {self.resume_path}" if self.resume_path else ""))
                return
            if args.eval:
                task.evaluate_only(task.model)
                return
            if self.finished:
                if env.is_main:
                    print(f"the run in {args.output_dir} has trained all {self.epochs} epochs: nothing to do "
                          "(raise --epochs to train longer)")
                return
            self.watch.install()  # from here a stop signal is acted on at the next check, with a checkpoint
            self._start_outputs()
            if env.is_main:
                first = self.first_plan
                split = f"{first.batch} per process" + (f" x {first.accum} accumulation steps"
                                                        if first.accum > 1 else "")
                print(f"{task.describe()}; ToE stages start at epochs {args.expansion_step}; "
                      f"{env.world_size} process(es) on {self.device.type}{self.device_note}; "
                      f"global batch {self.global_batch} "
                      f"({split})", flush=True)
            if self.rng is not None and self.position is None:
                set_rng_state(self.rng, self.device)  # mid-epoch: restored once the loader exists
            last_epoch = self.epochs
            if args.stop_after_epochs is not None:
                last_epoch = min(self.epochs, self.start_epoch + args.stop_after_epochs)
            for epoch in range(self.start_epoch, last_epoch):
                self.train_epoch(epoch)
                if epoch + 1 < last_epoch and self._agreed_stop():
                    raise Preempted(f"{self.stop_reason} after epoch {epoch}; {self._saved_message()}")
            if last_epoch < self.epochs and env.is_main:
                print(f"stopped after --stop-after-epochs {args.stop_after_epochs}: {self._saved_message()}",
                      flush=True)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._saved_message()) from None
        except WriteFailed as error:  # (rank 0's) full disk or read-only folder: what the folder still holds
            raise WriteFailed(f"{error}; {self._saved_message()}") from None
        except TrainingStopped as error:
            raise TrainingStopped(f"{error}; {self._saved_message(advice=False)}") from None
        finally:
            if self.log is not None:
                self.log.close()
            self.output_lock.release()
            cleanup()
            # last: a process stopped with a checkpoint is not killed by a launcher's SIGTERM (torchrun
            # stops the others when the first one exits) before it has said so
            self.watch.uninstall()

    def _start_outputs(self) -> None:
        """Say where the run writes; clear an old run for --overwrite; write args.yaml; open the log."""
        args = self.args
        if self.env.is_main:
            if not args.output_dir:
                print("note: no --output_dir: nothing will be saved (no checkpoints, no log). Pass --output_dir "
                      "to keep the run", flush=True)
            else:
                os.makedirs(args.output_dir, exist_ok=True)
                if self.output_lock.claim():  # a folder made only now: another run may have made it since set-up
                    check_no_other_run(args.output_dir, self.resume_path, args.overwrite)
                if args.overwrite and not self.resume_path:
                    remove_run_outputs(args.output_dir)
                # the module that defines the model: importing it registers a trainer's own models
                # (LV-ViT) in timm, so shared tools (the summary) can build them
                info = {**self.task.outputs_info(), "model_module": type(self.task.model).__module__}
                # "derived" names what is not a flag, so that the file reads back as a config (ToE.common.config)
                save_args({**self.config, **info, "derived": [*self.derived, *info]}, args.output_dir)
        barrier()  # no process writes before the old run's files are gone
        step = self._resume_step()
        self.log = RunLog(args.output_dir, enabled=self.env.is_main, first_epoch=self.start_epoch, first_step=step,
                          first_image=self.images_trained)

    def _resume_step(self) -> int:
        """The micro-batches of the resumed epoch that are done on each process: the position's updates
        times this run's accumulation, so a run resumed on another number of processes (the images per
        update kept) leaves the same images of the epoch to train (DistributedSampler deals one
        permutation out round-robin, so the first updates x global batch of it are the ones done). A
        checkpoint without ``updates`` (older) gives its own micro-batch count. 0 without a position."""
        position = self.position
        if position is None:
            return 0
        if "updates" in position:
            return int(position["updates"]) * self.task.plan[int(position["epoch"])].accum
        return int(position["step"])

    def _agreed_stop(self) -> bool:
        """Whether any process was told to stop (signal, time limit): all processes get the same answer,
        and ``stop_reason`` the same words (a signal may have reached one process only)."""
        self.stop_reason = agreed_reason(all_reduce_sum(torch.tensor(self.watch.reasons())).tolist())
        return self.stop_reason is not None

    def _saved_message(self, advice: bool = True) -> str:
        """What the output folder holds to continue from, read from its files (every way a run stops
        says it alike: ToE.common.checkpoint.saved_state). Rank 0 tells it; the others do not read."""
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return "(rank 0 tells what was saved)"
        if self.args.eval:
            return "--eval writes nothing"
        return saved_state(self.args.output_dir, self.resume_path or "", advice=advice)

    def train_epoch(self, epoch: int) -> None:
        """Train, evaluate, log and checkpoint ``epoch`` (raises Preempted after a mid-epoch checkpoint)."""
        env, task = self.env, self.task
        plan = task.plan[epoch]
        stage = self.toe.update_current_stage(epoch)
        ema_operator = getattr(self.model_ema.module, "token_select", None) if self.model_ema is not None else None
        if ema_operator is not None:  # the EMA is a deep copy with its own operator (--sparse-eval)
            ema_operator.update_current_stage(epoch)
        if task.lr_scheduler is not None:
            task.lr_scheduler.step(epoch)
        position = self.position if self.position is not None and self.position["epoch"] == epoch else None
        start_step = self._resume_step() if position is not None else 0
        self.position = None
        loader = task.train_loader(epoch, plan, start_step)
        stats = self.train_steps(epoch, plan, loader, start_step, position)
        if "stopped_at_step" in stats:  # a stop is agreed at the end of an update only
            self._save(epoch - 1, position={"epoch": epoch, "step": stats["stopped_at_step"],
                                            "updates": stats["stopped_at_step"] // plan.accum, "sums": stats["sums"]})
            raise Preempted(f"{self.stop_reason} in epoch {epoch} after step {stats['stopped_at_step']}; "
                            + self._saved_message())
        # the unwrapped model: shards may differ by a batch, and DDP's forward may sync the processes
        test = task.evaluate(task.model)
        ema = task.evaluate(self.model_ema.module) if self.model_ema is not None else None
        metric = task.best_metric
        judged = ema if ema is not None and getattr(self.args, "best_of", "model") == "ema" else test
        is_best = plan.counts_for_best and judged[metric] > self.best
        if is_best:
            self.best = judged[metric]
        record = {"epoch": epoch, "stage": stage, **stats, **{f"test_{k}": v for k, v in test.items()},
                  f"best_{metric}": self.best, **plan.log}
        if ema is not None:
            record[f"ema_{metric}"] = ema[metric]
        if env.is_main:
            evaluation = task.eval_text(test) + (f", EMA {task.eval_text(ema)}" if ema is not None else "")
            said = {f"test_{key}" for key in test} | {f"ema_{metric}"}  # the evaluation's own words say these
            print(console_line(record, evaluation, hidden=said - set(task.console_metrics)), flush=True)
        if self.log is not None:  # (train_epoch driven without fit(): no log)
            self.log.write(record, step=epoch)
        self._save(epoch, is_best=is_best)

    def train_steps(self, epoch: int, plan: EpochPlan, loader: Iterable, start_step: int,
                     position: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """One pass over ``loader`` (the epoch's batches after ``start_step``): forward under
        autocast, scaled backward, ``plan.accum`` micro-batches per update (a trailing incomplete
        group is not trained on), clipping, the optimizer and EMA, per-update lr when
        ``task.updates_per_epoch`` is set. No per-step host sync: the loss is summed and checked for nan/inf on the
        device and read every ``--log-interval`` steps, where the stop check (summed over the
        processes, so all stop at the same step) is asked too. Returns the epoch's means; after a
        stop, ``stopped_at_step`` and the running ``sums`` for the mid-epoch checkpoint."""
        args, task, device, accum = self.args, self.task, self.device, plan.accum
        optimizer, scheduler = task.optimizer, task.lr_scheduler
        self.model.train()
        sums: Dict[str, torch.Tensor] = {}  # name -> sum over images (device); "images", "steps" counts
        tokens = [0.0, 0.0]  # patch tokens, kept patch tokens, summed over steps
        non_finite = torch.zeros((), dtype=torch.bool, device=device)
        images_seen, steps = 0, 0
        start = time.perf_counter()
        batches = iter(loader)
        if position is not None and self.rng is not None:
            set_rng_state(self.rng, device)  # after the iterator exists: creating it draws from the global RNG
        # disable=None: a bar on terminals only, so log files and CI output stay readable
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch}", disable=None if self.env.is_main else True,
                   dynamic_ncols=True, leave=False)
        micro_steps = ((len(loader) + start_step) // accum) * accum
        updates = task.updates_per_epoch
        if updates is not None:
            micro_steps = min(micro_steps, updates * accum)
        check_every = max(1, args.log_interval // accum) * accum  # steps between stop checks
        stopped_at, norm = None, None
        compile_seconds = 0.0  # steps that compiled a graph (--torchcompile): not training time
        for step, batch in enumerate(bar, start=start_step + 1):
            if step > micro_steps:
                break
            if self.compiled:
                graphs, step_start = compiled_graphs(), time.perf_counter()
            first_of_update, last_of_update = (step - 1) % accum == 0, step % accum == 0
            if first_of_update and updates is not None and scheduler is not None:
                scheduler.step_update(num_updates=epoch * updates + (step - 1) // accum)
            # DDP: all-reduce the gradients only on the micro-batch that completes an update
            sync = nullcontext if last_of_update or not hasattr(self.model, "no_sync") else self.model.no_sync
            with sync(), autocast(device, self.amp_dtype):
                loss, metrics, count = task.train_step(self.model, batch)
            loss_value = loss.detach()
            non_finite |= ~torch.isfinite(loss_value)
            logging_now = step % args.log_interval == 0
            if logging_now:  # the loop's one deliberate read of the device: before a non-finite loss updates
                self.check_finite(non_finite, epoch)
            if first_of_update:
                optimizer.zero_grad(set_to_none=True)
            with sync():
                self.scaler.scale(loss if accum == 1 else loss / accum).backward()
            if last_of_update:
                self.scaler.unscale_(optimizer)  # a no-op without fp16's loss scale
                norm = task.before_optimizer_step(task.model)
                if logging_now and norm is None:
                    norm = gradient_norm(task.model)
                self.scaler.step(optimizer)
                self.scaler.update()
                if self.model_ema is not None:
                    self.model_ema.update(task.model)
            if logging_now:
                self._log_step(epoch, step, loss_value, norm if last_of_update else None,
                               (images_seen + count) / max(time.perf_counter() - start, 1e-9), bar)
            # the tokens the forward really ran on, not what the schedule says
            patches = metrics.pop("patch_tokens")
            kept = metrics.pop("kept_tokens", None)
            if kept is None:
                kept = self.toe.kept_in_last_forward(patches)
            tokens[0] += patches
            tokens[1] += kept
            for name, value in {"loss": loss_value, **metrics}.items():
                value = torch.as_tensor(value, device=device).detach().to(torch.float64) * count
                sums[name] = sums[name] + value if name in sums else value
            if self.compiled and compiled_graphs() > graphs:
                compile_seconds += time.perf_counter() - step_start
            images_seen += count
            self.images_trained += count * self.env.world_size  # the x axis of the step log (checkpointed)
            steps += 1
            if last_of_update and step % check_every == 0 and step < micro_steps and self._agreed_stop():
                stopped_at = step
                break
        self.check_finite(non_finite, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        names = sorted(sums)
        local = torch.stack([sums[name] for name in names]).cpu() if names else torch.zeros(0, dtype=torch.float64)
        counts = torch.tensor([float(images_seen), float(steps), *tokens], dtype=torch.float64)
        totals = all_reduce_sum(torch.cat([local, counts]))
        carried = (position or {}).get("sums", {})
        total = {name: totals[i].item() + carried.get(name, 0.0) for i, name in enumerate(names)}
        for i, name in enumerate(("images", "steps", "patch_tokens", "kept_tokens")):
            total[name] = totals[len(names) + i].item() + carried.get(name, 0.0)
        total["seconds"] = time.perf_counter() - start - compile_seconds + carried.get("seconds", 0.0)
        total["compile_seconds"] = compile_seconds + carried.get("compile_seconds", 0.0)
        if stopped_at is not None:
            return {"stopped_at_step": stopped_at, "sums": total}
        images, steps = max(total["images"], 1.0), max(total["steps"], 1.0)
        stats = {f"train_{name}": total[name] / images for name in names}
        stats.update({"lr": optimizer.param_groups[0]["lr"], "updates": micro_steps // accum,
                      "epoch_seconds": total["seconds"],
                      **({"compile_seconds": round(total["compile_seconds"], 2), "compiled_graphs": compiled_graphs()}
                         if self.compiled else {}),
                      "patch_tokens": _whole(total["patch_tokens"] / steps),
                      "kept_tokens": _whole(total["kept_tokens"] / steps)})
        return stats

    def _log_step(self, epoch: int, step: int, loss: torch.Tensor, norm: Optional[torch.Tensor],
                  images_per_second: float, bar) -> None:
        """Every --log-interval steps: the progress bar, log_steps.txt and TensorBoard (loss, lr,
        gradient norm of the last update, images per second of this process)."""
        lr = self.task.optimizer.param_groups[0]["lr"]
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        record = {"epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                  "images_per_second": round(images_per_second * self.env.world_size, 2)}
        if norm is not None:
            record["grad_norm"] = float(norm)
        if self.log is not None:  # (train_steps driven without fit(): no log)
            self.log.write_step(record, self.images_trained)

    def check_finite(self, non_finite: torch.Tensor, epoch: int) -> None:
        """Raise TrainingStopped on every process if any process saw a non-finite loss (summed, so
        all stop together). Reading the flag waits for the device: logging intervals only."""
        if all_reduce_sum(non_finite.detach().to(torch.float32).reshape(1)).item() > 0:
            raise TrainingStopped(f"the loss became nan or inf in epoch {epoch}. Lower the learning rate, raise the "
                                  "warmup or clip the gradients")

    def _save(self, epoch: int, is_best: bool = False, position: Optional[Dict[str, Any]] = None) -> None:
        """Write checkpoint.pth (and best_checkpoint.pth) with every process's RNG state; atomic."""
        if not self.args.output_dir:
            return
        started = time.monotonic()
        env, task = self.env, self.task
        state = {
            "model": trained_state(task.model),  # frozen weights (VPT's backbone) come from --finetune
            "frozen_checksum": frozen_checksum(task.model),
            "optimizer": task.optimizer.state_dict(),
            # for reference only (DeiT's layout): a resume rebuilds the schedule from the flags
            "lr_scheduler": task.lr_scheduler.state_dict() if task.lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            # the EMA's plain weights (no "module." prefix): they load into the model as it is
            "model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
            "epoch": epoch,
            "images_trained": self.images_trained,
            f"best_{task.best_metric}": self.best,
            "num_classes": task.num_classes,
            "world_size": env.world_size,
            "args": self.config,
        }
        rng = rng_state(self.device)
        if env.distributed:  # every process's stream goes into the one file, so each resumes its own
            gathered = [None] * env.world_size
            torch.distributed.all_gather_object(gathered, rng)
            state["rng"] = {str(rank): value for rank, value in enumerate(gathered)}
        else:
            state["rng"] = {"0": rng}
        if position is not None:
            state["position"] = position
        path = os.path.join(self.args.output_dir, "checkpoint.pth")
        if env.is_main:
            # best first: a stop between the two leaves checkpoint.pth at the epoch before, whose
            # resume trains this epoch again and rewrites best_checkpoint.pth (the other order could
            # leave a best epoch that no later epoch beats without its best_checkpoint.pth)
            if is_best:
                save_checkpoint(state, os.path.join(self.args.output_dir, "best_checkpoint.pth"))
            save_checkpoint(state, path)
            if position is None and getattr(self.args, "checkpoint_hist", 0):
                keep_history(self.args.output_dir, epoch, self.args.checkpoint_hist)
        barrier()
        self.watch.saved(time.monotonic() - started)
