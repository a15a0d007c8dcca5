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
from typing import Dict, List

import torch
from torch import nn

from .errors import UserError

HEADS = ("head.", "head_dist.")


def read_vit_weights(path: str, flag: str) -> Dict[str, torch.Tensor]:
    """The ViT state dict in ``path``; a missing, corrupt or foreign file is one UserError naming ``flag``."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist. Pass a DeiT/timm ViT checkpoint on disk (e.g. a "
                        "checkpoint.pth of this project, or the published deit_small_patch16_224-cd65a155.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise several types
        raise UserError(f"{flag} {path} is corrupt or not a torch checkpoint ({error.__class__.__name__}). "
                        "Pass a DeiT/timm state dict") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise UserError(f"{flag} {path} holds no ViT weights (no pos_embed). Pass a DeiT/timm ViT classification "
                        "checkpoint")
    return dict(state)


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
    dropped = [key for key in state if key.startswith(HEADS) and (key not in own or own[key].shape != state[key].shape)]
    for key in dropped:
        del state[key]
    if dropped:
        notes.append(f"--finetune: the classifier head of {path} has another class count ({', '.join(dropped)} "
                     "dropped): the new head starts from its initialisation")
    if "dist_token" in state and "dist_token" not in own:  # a distilled DeiT into a plain ViT: its token goes
        state.pop("dist_token")
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    pos, wanted = state["pos_embed"], own["pos_embed"]
    if pos.dim() == 3 and pos.shape[-1] == wanted.shape[-1] and pos.shape[1] != wanted.shape[1]:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=prefix)
        old = round((pos.shape[1] - prefix) ** 0.5)
        notes.append(f"--finetune: position table resampled from a {old} x {old} to a {grid[0]} x {grid[1]} grid")
    missing = sorted(key for key in set(own) - set(state) if not key.startswith(HEADS))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    if missing or unexpected or wrong:
        raise UserError(f"--finetune {path} does not fit {type(model).__name__} "
                        f"({misfit(missing, unexpected, wrong)}). Pass the --model and --model-kwargs it was "
                        "trained with")
    model.load_state_dict(state, strict=False)
    return notes
