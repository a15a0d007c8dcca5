"""YOLOS on an unmodified timm VisionTransformer, with Token Expansion after block 0.

Sequence: ``[CLS] + patch tokens (row-major) + det_token_num [DET]``; the detection tokens sit at
the END and are the ToE operator's suffix tokens (passed through, never merged). The backbone's
modules (patch projection, class token, blocks, final norm) are timm's, called one by one: the
detector owns only what YOLOS adds (detection tokens, the position tables over the detection
grid, the mid-layer tables, the two MLP heads).

Shapes: B batch, H x W padded image, (gh, gw) = (H/p, W/p) patch grid, P = gh*gw patch tokens,
T det tokens, D width, K kept patch tokens.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

import token_select as toe_module
from ToE.common.errors import UserError


def resize_patch_pos_embed(patch_pe: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                           by_count: bool = False) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of patch position tables (L, gh0*gw0, D) to (L, gh*gw, D).

    Tables are compared by grid SHAPE: a new grid with the same patch count but another shape is
    resized too. ``by_count=True`` reproduces the published check (skip when the counts match),
    which lays a 32 x 54 table over a 36 x 48 grid row by row.
    """
    old_h, old_w = int(old_grid[0]), int(old_grid[1])
    new_h, new_w = int(new_grid[0]), int(new_grid[1])
    same = (old_h * old_w == new_h * new_w) if by_count else (old_h, old_w) == (new_h, new_w)
    if same:
        return patch_pe
    layers, _, dim = patch_pe.shape
    grid = patch_pe.reshape(layers, old_h, old_w, dim).permute(0, 3, 1, 2)        # (L, D, gh0, gw0)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(layers, new_h * new_w, dim)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between (PyTorch's default init), as DETR's heads."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class YOLOS(nn.Module):
    """The detector. ``forward(images (B, 3, H, W))`` -> ``{"pred_logits": (B, T, C+1),
    "pred_boxes": (B, T, 4)}``, boxes as sigmoid (cx, cy, w, h) relative to the padded image.

    Args:
        backbone: a timm VisionTransformer with one class token (``num_classes=0``); its
            ``pos_embed`` (1, 1 + g*g, D) is the source of the position table, so load the
            classification weights into it before building the detector.
        num_classes: largest category id + 1 (COCO: 91); one more logit is "no object".
        det_token_num: detection tokens T.
        init_pe_size: (H, W) in pixels of the stored patch table's grid (floored to the patch).
        mid_pe_size: (H, W) of the mid-layer tables, or None for none (YOLOS-Ti has none).
        pe_resize_by_count: reproduce the published resize check (by patch count, not shape).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, det_token_num: int = 100,
                 init_pe_size: Sequence[int] = (800, 1333), mid_pe_size: Optional[Sequence[int]] = None,
                 pe_resize_by_count: bool = False) -> None:
        super().__init__()
        if not getattr(backbone, "has_class_token", False) or backbone.num_prefix_tokens != 1 \
                or getattr(backbone, "no_embed_class", False) or backbone.pos_embed is None:
            raise UserError(f"backbone {type(backbone).__name__} needs exactly one class token with a position "
                            "embedding (a DeiT/ViT). Pick --backbone_name deit_tiny_patch16_224 or similar")
        self.backbone = backbone
        self.patch_size = toe_module.patch_size(backbone)
        self.det_token_num = int(det_token_num)
        self.num_classes = int(num_classes)
        self.pe_resize_by_count = bool(pe_resize_by_count)
        dim = backbone.embed_dim
        depth = len(backbone.blocks)

        # The classification table: CLS row + a square g x g patch table (DeiT: 14 x 14).
        source = backbone.pos_embed.detach()
        source_patches = source.shape[1] - 1
        side = math.isqrt(source_patches)
        if side * side != source_patches:
            raise UserError(f"backbone position table has {source_patches} patch rows, not a square grid. Build the "
                            "backbone with a square img_size")
        self.init_grid = (int(init_pe_size[0]) // self.patch_size, int(init_pe_size[1]) // self.patch_size)
        patch_pe = resize_patch_pos_embed(source[:, 1:], (side, side), self.init_grid)
        det_pe = torch.empty(1, self.det_token_num, dim)
        nn.init.trunc_normal_(det_pe, std=0.02)
        # (1, 1 + P0 + T, D): [checkpoint CLS PE; resized checkpoint patch PE; new det PE]
        self.pos_embed = nn.Parameter(torch.cat([source[:, :1], patch_pe, det_pe], dim=1))
        # timm's own table is replaced by ours (its forward, which would add it, is not used)
        backbone.pos_embed = None
        self.det_token = nn.Parameter(torch.empty(1, self.det_token_num, dim))
        nn.init.trunc_normal_(self.det_token, std=0.02)

        self.mid_grid: Optional[Tuple[int, int]] = None
        self.mid_pos_embed: Optional[nn.Parameter] = None
        if mid_pe_size is not None:
            self.mid_grid = (int(mid_pe_size[0]) // self.patch_size, int(mid_pe_size[1]) // self.patch_size)
            count = 1 + self.mid_grid[0] * self.mid_grid[1] + self.det_token_num
            # one table added after each of blocks 0..depth-2 (before blocks 1..depth-1)
            self.mid_pos_embed = nn.Parameter(torch.empty(depth - 1, 1, count, dim))
            nn.init.trunc_normal_(self.mid_pos_embed, std=0.02)
            # Published order: the first mid table is added to block 0's output BEFORE ToE reduces
            # it. ToE's hook (token_select.attach) is a forward hook of block 0 too; prepend=True
            # runs this one first whenever the operator is attached.
            backbone.blocks[0].register_forward_hook(self._add_first_mid_pe, prepend=True)
        self._pending_mid_pe: Optional[torch.Tensor] = None

        self.class_embed = MLP(dim, dim, self.num_classes + 1, 3)
        self.bbox_embed = MLP(dim, dim, 4, 3)

    @property
    def token_select(self) -> Optional[toe_module.TokenSelect]:
        return getattr(self.backbone, "token_select", None)

    def attach_toe(self, operator: toe_module.TokenSelect) -> toe_module.TokenSelect:
        """Put ``operator`` after block 0 with the detection tokens as its suffix tokens."""
        operator.num_suffix_tokens = self.det_token_num
        return toe_module.attach(self.backbone, operator)

    def _position_table(self, table: torch.Tensor, stored_grid: Tuple[int, int],
                        grid: Tuple[int, int]) -> torch.Tensor:
        """(L, 1 + P0 + T, D) -> (L, 1 + P + T, D): the patch part resized to ``grid``."""
        cls_pe, patch_pe, det_pe = table[:, :1], table[:, 1:-self.det_token_num], table[:, -self.det_token_num:]
        patch_pe = resize_patch_pos_embed(patch_pe, stored_grid, grid, self.pe_resize_by_count)
        return torch.cat([cls_pe, patch_pe, det_pe], dim=1)

    def _add_first_mid_pe(self, module, args, output):
        if self._pending_mid_pe is None:
            return output
        return output + self._pending_mid_pe

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), H and W multiples of the patch -> det token features (B, T, D)."""
        backbone = self.backbone
        x = backbone.patch_embed.proj(images)                                  # (B, D, gh, gw)
        grid = (x.shape[2], x.shape[3])
        x = backbone.patch_embed.norm(x.flatten(2).transpose(1, 2))            # (B, P, D)
        batch = x.shape[0]
        x = torch.cat([backbone.cls_token.expand(batch, -1, -1), x, self.det_token.expand(batch, -1, -1)], dim=1)
        x = x + self._position_table(self.pos_embed, self.init_grid, grid)[0]  # (B, 1 + P + T, D)
        x = backbone.norm_pre(backbone.pos_drop(x))
        operator = self.token_select
        if operator is not None:
            operator.grid_size = grid  # uniform seeds follow this batch's grid
        mid = None
        if self.mid_pos_embed is not None:
            # all layers' tables resized at once (bicubic acts per channel and layer alike)
            mid = self._position_table(self.mid_pos_embed[:, 0], self.mid_grid, grid)   # (depth-1, 1 + P + T, D)
        # block 0 on all tokens: its hooks add mid table 0, then ToE reduces (B, 1 + K + T, D)
        self._pending_mid_pe = mid[0] if mid is not None else None
        try:
            x = backbone.blocks[0](x)
        finally:
            self._pending_mid_pe = None
        for i in range(1, len(backbone.blocks)):
            x = backbone.blocks[i](x)
            if mid is not None and i < len(backbone.blocks) - 1:
                x = x + self._gathered(mid[i], operator)
        x = backbone.norm(x)
        return x[:, -self.det_token_num:]

    @staticmethod
    def _gathered(table: torch.Tensor, operator: Optional[toe_module.TokenSelect]) -> torch.Tensor:
        """A mid table (N, D) for the tokens the sequence holds now: (N, D), or (B, 1 + K + T, D)
        gathered with the operator's ``last_index`` (B, 1 + K + T), for any batch size."""
        index = operator.last_index if operator is not None else None
        return table if index is None else table[index]

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.forward_features(images)                              # (B, T, D)
        # The two heads in the precision of their weights (float32), also under bf16/fp16 autocast: the
        # published YOLOS trained in fp32, and a bf16 box has 8 significant bits (steps of about 2.6 px on
        # a 1,333 px side). The backbone keeps the mixed precision; the heads are a sliver of the compute.
        dtype = self.bbox_embed.layers[0].weight.dtype
        with _no_autocast(features.device.type):
            features = features.to(dtype) if features.is_floating_point() else features
            return {"pred_logits": self.class_embed(features), "pred_boxes": self.bbox_embed(features).sigmoid()}


def _no_autocast(device_type: str):
    """Autocast off on ``device_type`` (nothing to turn off where torch has no autocast for it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Building: timm backbone, classification weights from disk
# ---------------------------------------------------------------------------------------------
def create_backbone(name: str, kwargs: Optional[dict] = None) -> nn.Module:
    """A timm ViT without head and with any input size (``pretrained=False``: nothing is downloaded)."""
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}. Pick a timm ViT, e.g. deit_tiny_patch16_224 or "
                        "deit_small_patch16_224")
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **dict(kwargs or {}))
    except TypeError as error:
        raise UserError(f"backbone {name} does not take these arguments ({error}). Check --backbone-kwargs") from None
    if type(backbone).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise UserError(f"backbone {name} ({type(backbone).__name__}) is not a plain timm VisionTransformer. "
                        "Pick deit_*/vit_* (not relpos/rotary models)")
    backbone.patch_embed.strict_img_size = False
    return backbone


def load_init_checkpoint(backbone: nn.Module, path: str) -> None:
    """Load classification weights into ``backbone`` (heads dropped; the position table may have
    any square grid, it is resized when the detector is built).

    Accepts a published DeiT file (``{"model": ...}``), a plain timm state dict, or this project's
    DeiT ``checkpoint.pth``. A distillation token and its position row are dropped.
    """
    from ToE.common.pretrained import misfit, read_vit_weights

    state = read_vit_weights(path, "--init-checkpoint")
    if "norm.weight" not in state and "fc_norm.weight" in state:  # an average-pooling classifier (timm:
        # fc_norm after the pooling, no norm before it): its fc_norm normalises the tokens here
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist.", "fc_norm.")) or
             k in backbone.state_dict()}
    if "dist_token" in state:
        state.pop("dist_token")
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if k != "pos_embed" and own[k].shape != state[k].shape)
    pos = state["pos_embed"]
    if pos.dim() != 3 or pos.shape[-1] != own["pos_embed"].shape[-1]:
        wrong.append("pos_embed")
    if missing or unexpected or wrong:
        raise UserError(f"init checkpoint {path} does not fit the backbone ({misfit(missing, unexpected, wrong)}). "
                        "Pass the matching --backbone_name/--backbone-kwargs or another checkpoint")
    # the table may come from another grid (14 x 14 vs the backbone's): take it as it is
    backbone.pos_embed = nn.Parameter(pos.clone())
    backbone.load_state_dict(state, strict=True)


def sincos_position_table(backbone: nn.Module, scale: float = 1.0) -> None:
    """Set the patch rows of ``backbone.pos_embed`` (1, 1 + g*g, D) to a 2-D sin-cos table
    (timm's ``build_sincos2d_pos_embed``, as MAE) times ``scale``; the class row stays.

    For training from scratch: the timm init (normal, std 0.02) carries so little position
    information next to the patch embeddings that the detector first predicts one mean box for
    a long time; box regression needs to know where a patch is.
    """
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    rows = backbone.pos_embed.shape[1] - 1
    side = math.isqrt(rows)
    table = build_sincos2d_pos_embed([side, side], backbone.pos_embed.shape[-1]) * scale     # (g*g, D)
    with torch.no_grad():
        backbone.pos_embed[0, 1:] = table.to(backbone.pos_embed)


@torch.no_grad()
def postprocess(outputs: Dict[str, torch.Tensor], orig_sizes: torch.Tensor):
    """Scores, labels and original-image xyxy boxes of every detection token (no threshold, no NMS).

    outputs: pred_logits (B, T, C+1), pred_boxes (B, T, 4) cxcywh in [0, 1];
    orig_sizes (B, 2) = (h, w). Returns a list of B dicts with scores (T,), labels (T,),
    boxes (T, 4) xyxy in pixels. The label is the best of the first C logits (not "no object").
    """
    probs = outputs["pred_logits"].float().softmax(-1)
    scores, labels = probs[..., :-1].max(-1)
    boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy")
    height, width = orig_sizes.float().unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
