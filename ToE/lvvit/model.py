"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers")
on timm layers, registered in timm's registry on ``import ToE.lvvit``.

    import timm, ToE.lvvit
    model = timm.create_model("lvvit_s", num_classes=1000)      # 26,151,824 parameters at 224 px

The state-dict names and shapes are the published ones (``patch_embed.conv1``/``bn1``..``proj``,
``cls_token``, ``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``head``, ``aux_head``), so a published checkpoint loads with ``strict=True``.

Outputs (B batch, N = H*W patch tokens, C classes):
- train mode with the aux head: ``(x_cls (B, C), x_aux (B, N, C), box)``; ``box`` is the MixToken
  box ``(r1, c1, r2, c2)`` on the patch grid, a (4,) long tensor (rows r1:r2, cols c1:c2; empty = no mixing).
- eval mode: ``x_cls + 0.5 * x_aux.max(1)`` (per-class max over the patch tokens), one (B, C) tensor.

Token Expansion: ``token_select.attach`` puts the operator after ``blocks[0]`` as in every ViT of the
project (``blocks``, ``patch_embed.grid_size``/``num_patches`` and ``num_prefix_tokens`` are what it
reads). When it reduced the sequence, the kept tokens go back to their grid positions after the
final norm through ``token_select.last_index``; the other positions are zeros (published), so the
aux head gives its bias there. ``dense_mask`` then holds which positions were really computed.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model
from torch import nn

__all__ = ["LVViT", "mixtoken_box", "swap_box"]


class PatchEmbed4_2(nn.Module):
    """The 4-layer conv stem: conv7x7 s2 + BN + ReLU, [conv3x3 + BN + ReLU] x 2, then a
    (patch/2)-strided projection. (B, 3, S, S) -> (B, D, S/patch, S/patch)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_dim: int = 64) -> None:
        super().__init__()
        if img_size % patch_size or patch_size % 2:
            raise ValueError(f"img_size {img_size} must be a multiple of the (even) patch size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_dim, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        self.proj = nn.Conv2d(stem_dim, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with the published key names (``qkv`` without bias, ``proj``);
    fused scaled-dot-product attention (q scaled by head_dim^-0.5)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads, bias=False)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, -1))


class Block(nn.Module):
    """x += DropPath(Attn(LN x)) / skip_lam; x += DropPath(MLP(LN x)) / skip_lam (skip_lam is a constant)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, skip_lam: float) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


def mixtoken_box(grid: Tuple[int, int], device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The published MixToken box on an (H, W) grid, a (4,) long tensor (r1, c1, r2, c2): lambda ~
    Beta(1, 1) (uniform), side int(H * sqrt(1 - lambda)) around a uniform centre, clipped to the grid;
    rows r1:r2, cols c1:c2; may be empty. Drawn from torch's generator as tensors (the published code
    draws the same distribution from numpy), so that a compiled forward (``--torchcompile``) neither
    breaks its graph nor compiles one graph per box, and a resume restores the stream with torch's."""
    height, width = grid
    draws = torch.rand(3, device=device, generator=generator, dtype=torch.float64)  # lambda, centre row, col
    cut = torch.sqrt(1.0 - draws[0])
    half_h, half_w = (height * cut).floor().long() // 2, (width * cut).floor().long() // 2
    row, col = (draws[1] * height).floor().long(), (draws[2] * width).floor().long()
    return torch.stack([(row - half_h).clamp(0, height), (col - half_w).clamp(0, width),
                        (row + half_h).clamp(0, height), (col + half_w).clamp(0, width)])


def swap_box(x: torch.Tensor, box, channels_last: bool) -> torch.Tensor:
    """Inside ``box`` (r1, c1, r2, c2: a tensor or numbers) sample b takes sample B-1-b's values; x is
    (B, D, H, W) or (B, H, W, D) (``channels_last``). Applied twice it is the identity (the published
    mix and un-mix); an empty box changes nothing. A mask, not slices: the box may be a tensor."""
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    r1, c1, r2, c2 = torch.as_tensor(box, device=x.device).unbind(0)
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    inside = ((rows >= r1) & (rows < r2))[:, None] & ((cols >= c1) & (cols < c2))[None, :]     # (H, W)
    mask = inside[None, :, :, None] if channels_last else inside[None, None]
    return torch.where(mask, x.flip(0), x)


class LVViT(nn.Module):
    """LV-ViT: conv stem, class token, learned positions, ``depth`` blocks with skip_lam, final LN,
    ``head`` on the class token and (``return_dense``) ``aux_head`` on every patch token."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, skip_lam: float = 2.0, stem_dim: int = 64,
                 return_dense: bool = True, mix_token: bool = True, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"LVViT got unexpected arguments {sorted(kwargs)}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.return_dense = return_dense
        self.mix_token = mix_token
        self.patch_embed = PatchEmbed4_2(img_size, patch_size, in_chans, embed_dim, stem_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, rate, skip_lam) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if return_dense:
            self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # (B, N) bool after a train forward that reduced tokens: True where the aux output was computed
        self.dense_mask: Optional[torch.Tensor] = None
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, 3, S, S) -> (B, 1 + N, D) after the final norm, on the full grid; and the MixToken box."""
        x = self.patch_embed(x)                                               # (B, D, H, W)
        box = None
        if self.mix_token and self.return_dense and self.training:
            box = mixtoken_box(self.patch_embed.grid_size, device=x.device)
            x = swap_box(x, box, channels_last=False)
        x = x.flatten(2).transpose(1, 2)                                      # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        full_tokens = x.shape[1]
        for block in self.blocks:  # ToE's hook on blocks[0] (when attached) may shorten the sequence
            x = block(x)
        x = self.norm(x)
        self.dense_mask = None
        if x.shape[1] != full_tokens:
            x = self._back_to_grid(x, full_tokens)
        return x, box

    def _back_to_grid(self, x: torch.Tensor, full_tokens: int) -> torch.Tensor:
        """Scatter the kept tokens (B, 1 + K, D) to their positions in a zero (B, 1 + N, D) tensor."""
        index = self.token_select.last_index                                  # (B, 1 + K), cls at 0
        if index is None or index.shape[1] != x.shape[1]:
            raise RuntimeError("LV-ViT got a reduced sequence without the matching token_select.last_index")
        full = x.new_zeros(x.shape[0], full_tokens, x.shape[2])
        full = full.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)
        mask = torch.zeros(x.shape[0], full_tokens, dtype=torch.bool, device=x.device)
        self.dense_mask = mask.scatter(1, index, True)[:, 1:]                 # (B, N)
        return full

    def forward(self, x: torch.Tensor):
        x, box = self.forward_features(x)
        x_cls = self.head(x[:, 0])
        if not self.return_dense:
            return x_cls
        x_aux = self.aux_head(x[:, 1:])                                       # (B, N, C)
        if not self.training:
            return x_cls + 0.5 * x_aux.max(1)[0]
        height, width = self.patch_embed.grid_size
        if box is None:
            box = torch.zeros(4, dtype=torch.long, device=x.device)  # no mixing: an empty box
        else:
            # un-mix: every aux prediction faces the image its position came from (an empty box: no change)
            x_aux = swap_box(x_aux.reshape(x_aux.shape[0], height, width, -1), box, channels_last=True)
            x_aux = x_aux.reshape(x_aux.shape[0], height * width, -1)
            if self.dense_mask is not None:
                mask = swap_box(self.dense_mask.reshape(-1, height, width, 1), box, channels_last=True)
                self.dense_mask = mask.reshape(-1, height * width)
        return x_cls, x_aux, box


# ---------------------------------------------------------------------------------------------
# Registered variants (published sizes; all with the aux head and MixToken)
# ---------------------------------------------------------------------------------------------
def _create(pretrained: bool, **kwargs) -> LVViT:
    if pretrained:
        raise ValueError("LV-ViT has no downloadable weights here: create it with pretrained=False and load "
                         "a checkpoint from disk (the published state-dict names load with strict=True)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory passes these
        kwargs.pop(key, None)
    return LVViT(**kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """8,534,720 parameters at 224 px, 1000 classes."""
    return _create(pretrained, **{**dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0), **kwargs})


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """26,151,824 parameters at 224 px, 1000 classes."""
    return _create(pretrained, **{**dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0), **kwargs})


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """55,830,544 parameters at 224 px, 1000 classes."""
    return _create(pretrained, **{**dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0), **kwargs})


@register_model
def lvvit_l(pretrained: bool = False, **kwargs) -> LVViT:
    """150,021,968 parameters at 224 px, 1000 classes (stem width 128)."""
    return _create(pretrained, **{**dict(embed_dim=768, depth=24, num_heads=12, mlp_ratio=3.0, skip_lam=3.0,
                                         stem_dim=128), **kwargs})


@register_model
def lvvit_digits(pretrained: bool = False, **kwargs) -> LVViT:
    """The embedded-data variant: 32 px, patch 4 (8 x 8 = 64 tokens), dim 96, depth 6, 3 heads, stem 32."""
    return _create(pretrained, **{**dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                                         mlp_ratio=3.0, skip_lam=2.0, stem_dim=32, num_classes=10), **kwargs})
