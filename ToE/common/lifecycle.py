"""The one run lifecycle of every trainer: ``Run(args, Task).fit()``.

The run owns what does not depend on the task: the resolved configuration and its identity for
resume, the output folder and its protection, (auto-)resume, the RNG hand-over, preemption and the
time limit (every stop decision agreed by all processes), atomic checkpoints with the position
inside the epoch, logs, AMP and the GradScaler, the DDP wrap, the EMA, gradient accumulation and
the epoch loop. In order:

    flags -> ToE operator -> output folder -> resume file (flags that must match) -> processes
    -> task (model, data, loss, optimizer) -> resume state -> for each epoch:
         plan = task.plan(epoch); ToE stage from the epoch; train (stop checks); evaluate; log; checkpoint

A task is a plain object that holds what is its own (classification: ``ToE/common/classification.py``,
detection: ``ToE/yolos/trainer.py``). Its class provides:

    best_metric             the evaluation key that makes best_checkpoint.pth ("acc1", "AP")
    weights_must_match      flags --eval must share (they shape the weights)
    misfit                  (what the model is, which flags to pass) when weights do not fit
    check_flags(args)       static: cross-flag checks before any work; returns warnings
    Task(args, run)         builds model (operator attached, on run.device), data, loss, optimizer,
                            lr_scheduler (a timm scheduler or None), updates_per_epoch (None: the
                            lr steps per epoch), plan, num_classes, clip_grad, ema_decay (None: no EMA)
    task.plan               the run's plan: plan(epoch) is an EpochPlan; plan.epochs, plan.per_update,
                            plan.identity (derived values stored with the run, checked on resume)
    train_loader(epoch, plan, skip)   the epoch's batches without its first ``skip``
    train_step(model, batch)          (loss, metrics {name: per-image mean}, images)
    evaluate(model)         stats {"loss", best_metric, "images", ...}, the same on every process
    eval_text(stats), describe(), outputs_info(), evaluate_only(model)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from contextlib import nullcontext
from typing import Any, Dict, Iterable, Optional

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ToE.common.args import TOE_KEYS, build_token_select
from ToE.common.checkpoint import (check_resume_args, frozen_checksum, load_checkpoint, rng_state, save_checkpoint,
                                   saved_state, seed_everything, set_rng_state, trained_state)
from ToE.common.distributed import all_reduce_sum, barrier, cleanup, gather_ints, init_distributed
from ToE.common.errors import Preempted, TrainingInterrupted, TrainingStopped, UserError, WriteFailed
from ToE.common.lock import OutputLock
from ToE.common.log import RunLog, check_no_other_run, check_output_dir, remove_run_outputs, save_args
from ToE.common.preemption import StopSignal, StopWatch
from ToE.common.pretrained import check_resumable, misfit

# Flags that do not change what a run computes: a resume may give other values. Every other flag
# is part of the run's identity and must match its checkpoint (the epoch count is checked apart:
# it may grow). Paths may move (data, teacher, labels, the init checkpoint only used at the start);
# the precision may change (a fresh loss scale); an EMA may be added to a run that had none.
NOT_IDENTITY = frozenset({
    "config", "output_dir", "resume", "auto_resume", "overwrite", "check_only", "eval", "epochs", "start_epoch",
    "stop_after_epochs", "time_limit", "log_interval", "device", "amp_dtype", "num_workers", "pin_mem", "dist_eval",
    "eval_batch_size", "results_json", "data_path", "teacher_path", "token_label_data", "init_checkpoint", "model_ema",
    "finetune", "data_backend",
    "global_batch",  # checked as the images per update the run resolved (_resume), not as the flag
    "best_of", "eval_amp",  # what is reported and how it is evaluated, not what trains
})
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with. A curriculum (EfficientTrain) changes it per epoch; elsewhere
    it is constant. ``batch``: images per process and micro-batch; ``accum``: micro-batches per
    update; ``crop``/``aa``/``view``: the classification input (side in px, RandAugment policy, device-side
    low-resolution view), None for the flags' own; ``counts_for_best``: whether the epoch's metric
    may make best_checkpoint.pth; ``log``: extra fields of the epoch's log record."""

    batch: int
    accum: int = 1
    crop: Optional[int] = None
    aa: Optional[str] = None
    view: Any = None
    counts_for_best: bool = True
    log: Dict[str, Any] = dataclasses.field(default_factory=dict)


class ConstantPlan:
    """Every epoch alike: ``batch`` per process and ``accum`` micro-batches per update (see
    ``ToE.common.schedule.split_global_batch``), ``epochs`` epochs, the lr stepped per epoch. A plan
    also has ``identity``: derived values stored with the run, checked on resume."""

    identity: Dict[str, Any] = {}
    per_update = False

    def __init__(self, epochs: int, batch: int, accum: int = 1) -> None:
        self.epochs = epochs
        self._plan = EpochPlan(batch=batch, accum=accum)

    def __call__(self, epoch: int) -> EpochPlan:
        return self._plan


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp-dtype`` on ``device``: auto is bf16 on GPUs that compute it natively (Ampere on),
    fp16 with loss scaling on older ones (T4, V100 only emulate bf16), off on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if name == "float16" and device.type != "cuda":
        raise UserError("--amp-dtype float16 needs a GPU (its loss scaling is CUDA's). Use bfloat16 on the CPU")
    return AMP_DTYPES[name]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """torch.amp autocast with ``amp_dtype`` on the run's device; full precision when None."""
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)


def to_device(value, device: torch.device):
    """``value`` on ``device``: a tensor, or a tuple/list/dict of them (other values as they are)."""
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


class SkipFirst(torch.utils.data.Sampler):
    """``sampler``'s order for the current epoch without its first ``count`` indices (mid-epoch resume)."""

    def __init__(self, sampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self):
        return iter(list(self.sampler)[self.count:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.count)


def epoch_loader(dataset, sampler, epoch: int, plan: EpochPlan, skip: int, **kwargs) -> torch.utils.data.DataLoader:
    """The training loader of ``epoch``: ``sampler``'s order for that epoch without its first ``skip``
    batches (a mid-epoch resume; they are not read), in the plan's batches, the last partial one dropped."""
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=plan.batch, drop_last=True,
                                       sampler=SkipFirst(sampler, skip * plan.batch) if skip else sampler, **kwargs)


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
        self.watch = StopWatch(args.time_limit)
        # one writer per output folder: the set-up takes the lock; a run refused during it gives it back
        self.output_lock = OutputLock("" if args.eval else args.output_dir)
        # A stop signal or Ctrl-C while the run sets up (data, labels, model, resume file) ends it at
        # once, in one line that says what the output folder holds; once training runs, a signal is
        # acted on at the next stop check (with a checkpoint) instead.
        try:
            with StopWatch.at_once(), self.output_lock.released_on_error():
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
        # --check-only runs on the CPU, but checks the precision of the device the run will use
        planned = torch.device("cuda") if args.device.startswith("cuda") and torch.cuda.is_available() else self.device
        self.amp_dtype = resolve_amp_dtype(args.amp_dtype, planned if args.check_only else self.device)
        if self.env.is_main:
            for warning in warnings:
                print(f"warning: {warning}", flush=True)
        seed_everything(args.seed + self.env.rank)

        self.task = task_class(args, self)
        task = self.task
        self.epochs = task.plan.epochs
        # the resolved configuration: the flags and what the run derived from them (args.yaml, resume identity)
        # (the flags as given, so that "-c OUT/args.yaml" runs it again; derived values beside them)
        first = task.plan(0)
        self.global_batch = first.batch * first.accum * self.env.world_size  # images per optimizer update
        self.derived = {"run_epochs": self.epochs, "accumulation": first.accum, **task.plan.identity}
        # args.yaml records the global batch the run trains with, whether a flag, a recipe or the
        # per-process batch x processes gave it: "-c OUT/args.yaml" reruns it on any number of processes
        self.config = {**vars(args), "global_batch": self.global_batch, "resume": self.resume_path, **self.derived}
        model = task.model
        self.model = model
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model_ema = self._new_ema() if task.ema_decay is not None else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch = args.start_epoch
        self.best = 0.0
        self.position: Optional[Dict[str, Any]] = None  # where inside an epoch a preempted run stopped
        self.rng: Optional[Dict[str, Any]] = None  # this process's RNG state to restore on resume
        self.finished = False  # --auto-resume found a run that has trained all its epochs
        self.log = RunLog("", enabled=False)  # opened in fit(), once the outputs are set up
        if self.resume_path:
            self._resume(checkpoint, stored)
        del checkpoint  # the loaded tensors are not kept beyond set-up
        if not args.eval:
            self._agree_on_start()

    # -- set-up ------------------------------------------------------------------------------------
    def _new_ema(self) -> ModelEmaV3:
        """An EMA copy of the current weights (operator included, so --sparse-eval follows it)."""
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
        if frozen and checkpoint.get("frozen_checksum") != frozen_checksum(task.model):
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
        step = int(self.position["step"]) if self.position is not None else 0
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
                first = task.plan(0)
                split = f"{first.batch} per process" + (f" x {first.accum} accumulation steps"
                                                        if first.accum > 1 else "")
                print(f"{task.describe()}; ToE stages start at epochs {args.expansion_step}; "
                      f"{env.world_size} process(es) on {self.device.type}; global batch {self.global_batch} "
                      f"({split})", flush=True)
            if self.rng is not None and self.position is None:
                set_rng_state(self.rng, self.device)  # mid-epoch: restored once the loader exists
            last_epoch = self.epochs
            if args.stop_after_epochs is not None:
                last_epoch = min(self.epochs, self.start_epoch + args.stop_after_epochs)
            for epoch in range(self.start_epoch, last_epoch):
                self.train_epoch(epoch)
                if epoch + 1 < last_epoch and self._agreed_stop():
                    raise Preempted(f"{self.watch.reason()} after epoch {epoch}; {self._saved_message()}")
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
        self.log = RunLog(args.output_dir, enabled=self.env.is_main, first_epoch=self.start_epoch)

    def _agreed_stop(self) -> bool:
        """Whether any process was told to stop (signal, time limit): all processes get the same answer."""
        flag = torch.tensor([1.0 if self.watch.should_stop() else 0.0])
        return all_reduce_sum(flag).item() > 0

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
        plan = task.plan(epoch)
        stage = self.toe.update_current_stage(epoch)
        ema_operator = getattr(self.model_ema.module, "token_select", None) if self.model_ema is not None else None
        if ema_operator is not None:  # the EMA is a deep copy with its own operator (--sparse-eval)
            ema_operator.update_current_stage(epoch)
        if task.lr_scheduler is not None:
            task.lr_scheduler.step(epoch)
        position = self.position if self.position is not None and self.position["epoch"] == epoch else None
        self.position = None
        start_step = int(position["step"]) if position is not None else 0
        loader = task.train_loader(epoch, plan, start_step)
        stats = self._train_steps(epoch, plan, loader, start_step, position)
        if "stopped_at_step" in stats:
            self._save(epoch - 1, position={"epoch": epoch, "step": stats["stopped_at_step"], "sums": stats["sums"]})
            raise Preempted(f"{self.watch.reason()} in epoch {epoch} after step {stats['stopped_at_step']}; "
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
            ema_text = f", EMA {task.eval_text(ema)}" if ema is not None else ""
            print(f"epoch {epoch}: stage {stage}, {record['kept_tokens']:g} of {record['patch_tokens']:g} patch "
                  f"tokens, loss {stats['train_loss']:.4f}, {stats['epoch_seconds']:.1f} s, {task.eval_text(test)}"
                  f"{ema_text}", flush=True)
        self.log.write(record, step=epoch)
        self._save(epoch, is_best=is_best)

    def _train_steps(self, epoch: int, plan: EpochPlan, loader: Iterable, start_step: int,
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
        stopped_at = None
        for step, batch in enumerate(bar, start=start_step + 1):
            if step > micro_steps:
                break
            first_of_update, last_of_update = (step - 1) % accum == 0, step % accum == 0
            if first_of_update and updates is not None and scheduler is not None:
                scheduler.step_update(num_updates=epoch * updates + (step - 1) // accum)
            # DDP: all-reduce the gradients only on the micro-batch that completes an update
            sync = nullcontext if last_of_update or not hasattr(self.model, "no_sync") else self.model.no_sync
            with sync(), autocast(device, self.amp_dtype):
                loss, metrics, count = task.train_step(self.model, batch)
            loss_value = loss.detach()
            non_finite |= ~torch.isfinite(loss_value)
            if step % args.log_interval == 0:
                self._stop_if_non_finite(non_finite, epoch)
                bar.set_postfix(loss=f"{loss_value.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if first_of_update:
                optimizer.zero_grad(set_to_none=True)
            with sync():
                self.scaler.scale(loss if accum == 1 else loss / accum).backward()
            if last_of_update:
                if task.clip_grad:
                    self.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(task.model.parameters(), task.clip_grad)
                self.scaler.step(optimizer)
                self.scaler.update()
                if self.model_ema is not None:
                    self.model_ema.update(task.model)
            # the tokens the forward really ran on, not what the schedule says
            patches = metrics.pop("patch_tokens")
            kept = metrics.pop("kept_tokens", None)
            if kept is None:
                index = self.toe.last_index
                kept = patches if index is None else index.shape[1] - self.toe.num_prefix_tokens - \
                    self.toe.num_suffix_tokens
            tokens[0] += patches
            tokens[1] += kept
            for name, value in {"loss": loss_value, **metrics}.items():
                value = torch.as_tensor(value, device=device).detach().to(torch.float64) * count
                sums[name] = sums[name] + value if name in sums else value
            images_seen += count
            steps += 1
            if last_of_update and step % check_every == 0 and step < micro_steps and self._agreed_stop():
                stopped_at = step
                break
        self._stop_if_non_finite(non_finite, epoch)
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
        total["seconds"] = time.perf_counter() - start + carried.get("seconds", 0.0)
        if stopped_at is not None:
            return {"stopped_at_step": stopped_at, "sums": total}
        images, steps = max(total["images"], 1.0), max(total["steps"], 1.0)
        stats = {f"train_{name}": total[name] / images for name in names}
        stats.update({"lr": optimizer.param_groups[0]["lr"], "updates": micro_steps // accum,
                      "epoch_seconds": total["seconds"],
                      "patch_tokens": _whole(total["patch_tokens"] / steps),
                      "kept_tokens": _whole(total["kept_tokens"] / steps)})
        return stats

    def _stop_if_non_finite(self, non_finite: torch.Tensor, epoch: int) -> None:
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
        barrier()
        self.watch.saved(time.monotonic() - started)
