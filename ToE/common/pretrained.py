"""Weights from disk for a new run: ``--finetune`` (classification) and ``--init-checkpoint`` (YOLOS).

One reader accepts the files people have: a published DeiT ``.pth`` (``{"model": ...}``), a plain
timm state dict, or this project's ``checkpoint.pth``. Nothing is downloaded: the file is on the
user's disk. ``finetune`` then fits the weights to the model as DeiT's ``--finetune`` does: a
classifier head whose class count differs is dropped (the new head starts fresh), the position
table is resampled to the model's patch grid (timm's ``resample_abs_pos_embed``, bicubic, the
class/distillation rows kept), and every other tensor must fit.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, List, Tuple

import torch
from torch import nn

from .errors import UserError


def classifier_heads(model: nn.Module) -> Tuple[str, ...]:
    """The state-dict prefixes of the model's classifier heads (``"head."``, ``"head_dist."``, LV-ViT's
    ``"aux_head."``): what ``get_classifier()`` returns and every other direct child that is a Linear onto
    the class count. Found from the model, not from a list of names, so each head of a new model is one."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else ()
    classifier = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    num_classes = getattr(model, "num_classes", None)
    return tuple(f"{name}." for name, child in model.named_children()
                 if any(child is head for head in classifier)
                 or (isinstance(child, nn.Linear) and child.out_features == num_classes))


# What a .pth file can hold, as ``checkpoint_kind`` names it (--resume and --finetune tell the user which it is)
RUN, VPT_RUN, WEIGHTS, OTHER = "run", "vpt", "weights", "other"


def _tensors(value) -> bool:
    """Whether ``value`` is a state dict: a non-empty mapping of names to tensors."""
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def checkpoint_kind(state) -> str:
    """What a loaded ``.pth`` holds, for the messages of --resume and --finetune:

    ``RUN``      a checkpoint.pth of this project (weights, optimizer, epoch and the run's flags): --resume continues it
    ``VPT_RUN``  the same of a --vpt run: its prompts and head only, on the --finetune backbone it was tuned from
    ``WEIGHTS``  pretrained weights: a timm state dict, or DeiT's published ``{"model": ...}`` (no optimizer, epoch
                 or flags): --finetune starts a new run from them
    ``OTHER``    anything else
    """
    if not isinstance(state, dict):
        return OTHER
    if _tensors(state.get("model")) and "optimizer" in state and "epoch" in state:
        return VPT_RUN if (state.get("args") or {}).get("vpt") else RUN
    if _tensors(state) or (_tensors(state.get("model")) and "optimizer" not in state):
        return WEIGHTS
    return OTHER


def weights_of(state) -> Dict[str, torch.Tensor]:
    """The model weights of what ``checkpoint_kind`` calls RUN, VPT_RUN or WEIGHTS."""
    return dict(state["model"] if _tensors(state.get("model")) else state)


def _vpt_backbone(path: str, state: dict) -> str:
    """What a VPT checkpoint is and what to pass instead, for a message that names the flag it was given to."""
    stored = state.get("args") or {}
    backbone = stored.get("finetune") or "BACKBONE.pth"
    return (f"is the checkpoint of a --vpt {stored.get('vpt')} run: it holds its prompts and head only, tuned on "
            f"the frozen backbone {backbone} (its --finetune). Pass --finetune {backbone} --vpt {stored.get('vpt')} "
            f"with --resume {path} to continue it, or with --eval --resume {path} to evaluate it")


def load_pth(path: str, what: str, fix: str):
    """``torch.load`` of a file the user named (weights only, on the CPU); a missing, foreign or corrupt file is
    one UserError that starts with ``what`` (e.g. "--finetune FILE") and ends with ``fix``."""
    if not os.path.isfile(path):
        reason = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"{what} {reason}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            # e.g. DeiT's own training checkpoint, which pickles its argparse flags: not corrupt, only not tensors
            raise UserError(f"{what} holds Python objects besides tensors (e.g. a training script's pickled flags), "
                            "which torch does not load from a file it cannot trust. If you trust it, save its weights "
                            "alone: torch.save(torch.load(FILE, weights_only=False)['model'], 'weights.pth')") from None
        raise UserError(f"{what} is corrupt or not a torch checkpoint (UnpicklingError). {fix}") from None
    except Exception as error:  # truncated or foreign files raise several types
        raise UserError(f"{what} is corrupt or not a torch checkpoint ({error.__class__.__name__}). {fix}") from None


def read_vit_weights(path: str, flag: str) -> Dict[str, torch.Tensor]:
    """The ViT state dict in ``path``; a missing, corrupt or foreign file is one UserError naming ``flag``,
    and a VPT checkpoint (prompts and head only) says what it is and what to pass instead."""
    state = load_pth(path, f"{flag} {path}", "Pass a DeiT/timm ViT checkpoint on disk (e.g. a checkpoint.pth of "
                                             "this project, or the published deit_small_patch16_224-cd65a155.pth)")
    kind = checkpoint_kind(state)
    if kind == VPT_RUN:
        raise UserError(f"{flag} {path} {_vpt_backbone(path, state)}")
    weights = weights_of(state) if kind != OTHER else {}
    if "pos_embed" not in weights:
        raise UserError(f"{flag} {path} holds no ViT weights (no pos_embed). Pass a DeiT/timm ViT classification "
                        "checkpoint")
    return weights


def check_resumable(path: str, state, args) -> dict:
    """``state`` (the loaded resume file) as a checkpoint --resume can use, or one UserError that says what the
    file is: pretrained weights are evaluated with --eval, but a training run starts from them with
    --finetune (--init-checkpoint for YOLOS), as there is no optimizer, epoch or flags to continue."""
    kind = checkpoint_kind(state)
    if kind in (RUN, VPT_RUN):
        return state
    if kind == WEIGHTS:
        if getattr(args, "eval", False):
            return {"model": weights_of(state)}
        flag = "--finetune" if hasattr(args, "finetune") else "--init-checkpoint"
        raise UserError(f"resume file {path} holds pretrained weights (a timm/DeiT state dict), not a run's "
                        f"checkpoint: it has no optimizer, epoch or flags to continue. To train from these weights, "
                        f"pass {flag} {path} instead of --resume (or evaluate them with --eval --resume {path})")
    keys = f" with keys {', '.join(map(str, list(state)[:4]))}" if isinstance(state, dict) else ""
    raise UserError(f"resume file {path} is neither a checkpoint of this project nor a state dict (a "
                    f"{type(state).__name__}{keys}). Pass the checkpoint.pth a run of this trainer wrote")


def misfit(missing: List[str], unexpected: List[str], wrong: List[str]) -> str:
    """What keeps a state dict from fitting a model, for a one-line message (the first three of each)."""
    return "; ".join(part for part in (
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        f"other shape {', '.join(wrong[:3])}" if wrong else "") if part)


def finetune(model: nn.Module, path: str) -> List[str]:
    """Load the weights of ``path`` into the timm ViT ``model`` for fine-tuning; return notes to print."""
    from timm.layers import resample_abs_pos_embed

    state = read_vit_weights(path, "--finetune")
    own = model.state_dict()
    notes = []
    heads = classifier_heads(model)
    # only true notes: a head is said to have another class count when its shape differs, not when it is dropped
    # for another reason (the distillation head of a distilled DeiT fine-tuned into a plain ViT)
    resized = [key for key in state if key.startswith(heads) and key in own and own[key].shape != state[key].shape]
    absent = [key for key in state if key.startswith(heads) and key not in own]  # e.g. --model-kwargs num_classes=0
    for key in resized + absent:
        del state[key]
    if resized:
        notes.append(f"--finetune: the classifier head of {path} has another class count ({', '.join(resized)} "
                     "dropped): the new head starts from its initialisation")
    if absent:
        notes.append(f"--finetune: the model has no {', '.join(absent)}: dropped")
    if "dist_token" in state and "dist_token" not in own:  # a distilled DeiT into a plain ViT: its token goes,
        state.pop("dist_token")                           # and the distillation head that reads it
        distillation = [key for key in state if key.startswith("head_dist.") and key not in own]
        for key in distillation:
            state.pop(key)
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
        notes.append(f"--finetune: {path} is a distilled DeiT and the model is not: its distillation "
                     f"{'token and head are' if distillation else 'token is'} dropped (the class token and its head "
                     "are kept)")
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    pos, wanted = state["pos_embed"], own["pos_embed"]
    if pos.dim() == 3 and pos.shape[-1] == wanted.shape[-1] and pos.shape[1] != wanted.shape[1]:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=prefix)
        old = round((pos.shape[1] - prefix) ** 0.5)
        notes.append(f"--finetune: position table resampled from a {old} x {old} to a {grid[0]} x {grid[1]} grid")
    missing = sorted(key for key in set(own) - set(state) if not key.startswith(heads))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    if missing or unexpected or wrong:
        raise UserError(f"--finetune {path} does not fit {type(model).__name__} "
                        f"({misfit(missing, unexpected, wrong)}). Pass the --model and --model-kwargs it was "
                        "trained with")
    model.load_state_dict(state, strict=False)
    return notes
