"""Visual Prompt Tuning (Jia et al., ECCV 2022) on an unmodified timm ViT, with Token Expansion.

``add_prompts(model, tokens, deep)`` gives the model N learnable prompt tokens after its prefix
tokens (class, distillation): shallow VPT inserts one set before block 0; deep VPT gives every
block its own set, replacing the previous block's prompt outputs. Forward pre-hooks on the blocks
put them in, so nothing of timm's forward is copied. The backbone is frozen (``freeze_backbone``):
only the prompts and the head train.

For the ToE operator the prompts are prefix tokens: the operator after block 0 passes them
through untouched, never merges into them and never drops them, and reduces only the patch tokens
(``prompt_tokens(model)`` is what the trainer adds to the operator's count, and what the FLOP
count adds to every block's sequence).
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from .pretrained import classifier_heads


class VisualPrompts(nn.Module):
    """The prompt tokens of a VPT model: (1, N, D) for shallow, (depth, N, D) for deep VPT."""

    def __init__(self, depth: int, tokens: int, dim: int, patch: int, deep: bool) -> None:
        super().__init__()
        self.deep, self.tokens = deep, tokens
        self.prompts = nn.Parameter(torch.empty(depth if deep else 1, tokens, dim))
        # VPT's initialisation: uniform with Xavier's bound over the patch embedding's fan-in and the width
        bound = math.sqrt(6.0 / float(3 * patch * patch + dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    def extra_repr(self) -> str:
        return f"{'deep' if self.deep else 'shallow'}, {self.tokens} tokens"


def prompt_tokens(model: nn.Module) -> int:
    """The prompt tokens every block of ``model`` sees (0 without VPT). Shallow and deep VPT alike add
    this many tokens to each block's sequence; for the operator and the FLOP count they are prefix tokens."""
    vpt = getattr(model, "vpt", None)
    return vpt.tokens if isinstance(vpt, VisualPrompts) else 0


def add_prompts(model: nn.Module, tokens: int, deep: bool) -> VisualPrompts:
    """Register ``model.vpt`` and the hooks that put its prompts after the prefix tokens.

    A model whose forward puts every token after the prefix back on the patch grid (LV-ViT's dense
    head, ``return_dense``) is a ``ValueError``: the prompts have no grid position."""
    if getattr(model, "return_dense", False):
        raise ValueError(f"VPT: {type(model).__name__} puts every token after the class token back on the patch grid "
                         "for its dense head, and prompt tokens have no place there")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    vpt = VisualPrompts(len(model.blocks), tokens, model.embed_dim, patch, deep)
    model.vpt = vpt

    def insert(block, args, kwargs):
        x = args[0]
        prompts = vpt.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, :prefix], prompts, x[:, prefix:]], dim=1), *args[1:]), kwargs

    def replace(index):
        def hook(block, args, kwargs):
            x = args[0]
            prompts = vpt.prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :prefix], prompts, x[:, prefix + tokens:]], dim=1), *args[1:]), kwargs
        return hook

    model.blocks[0].register_forward_pre_hook(insert, with_kwargs=True)
    if deep:
        for index in range(1, len(model.blocks)):
            model.blocks[index].register_forward_pre_hook(replace(index), with_kwargs=True)
    return vpt


def freeze_backbone(model: nn.Module) -> List[str]:
    """Train only the prompts and the classifier heads (``classifier_heads``: every head of the model, a
    distilled DeiT's two included); the rest stays the --finetune backbone. Return the frozen names."""
    trained = ("vpt.", *classifier_heads(model))
    frozen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trained))
        if not parameter.requires_grad:
            frozen.append(name)
    return frozen
