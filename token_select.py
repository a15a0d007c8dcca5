"""Token Expansion (ToE): the "initialization, expansion, merging" token selector.

Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024.

ToE sits on the output of the first transformer block. In the early stages of training it keeps
only part of the patch tokens and trains blocks 1..depth-1 on that shorter sequence; stage by
stage the kept share grows until the full sequence trains at the end. At test time it is off and
the network is the plain full-token transformer.

This file is self-contained (it needs torch only), so it can be copied into another project:

    import timm, token_select
    model = timm.create_model("deit_small_patch16_224")
    toe = token_select.attach(model, token_select.TokenSelect())   # per epoch: toe.update_current_stage(epoch)

Contents:
- ``TokenSelect``: the operator, with the published interface (``expansion_step``,
  ``keep_rate``, ``initialization_keep_rate``, ``expansion_multiple_stage``, ``distance``,
  ``update_current_stage(epoch)``, ``token_select(x) -> (x, index)``, ``sparse_inference``).
- Baseline reducers at ToE's place, on ToE's schedule and counts, with another choice of tokens:
  ``make_reducer(name, ...)`` for ``name`` in ``REDUCERS`` (``toe``; ``random``, PatchDropout;
  ``topk``, the tokens most like the class token; ``tome``, bipartite soft matching).
- ``attach(model, token_select)``: puts the operator after block 0 of an unmodified ViT: timm's
  ``VisionTransformer``, torchvision's ``VisionTransformer`` or a Hugging Face transformers ViT,
  DeiT, Dinov2 (with or without registers) or CLIP vision model (``placement`` says where).
- Pure arithmetic shared by the trainers, the tests and the FLOP calculator:
  ``stage_of_epoch``, ``expansion_plan``, ``kept_tokens_per_stage``, ``vit_step_flops``,
  ``schedule_flops`` and ``ideal_speedup``.

Shapes: B batch, N input tokens, P patch tokens, K kept patch tokens, C channels.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "TokenSelect",
    "REDUCERS",
    "make_reducer",
    "RandomReducer",
    "TopKReducer",
    "ToMeReducer",
    "attach",
    "detach",
    "reduction_problem",
    "placement",
    "Placement",
    "stage_of_epoch",
    "expansion_plan",
    "kept_tokens_per_stage",
    "seed_positions",
    "vit_step_flops",
    "schedule_flops",
    "ideal_speedup",
]

DISTANCES = ("cosine", "manhattan", "euclidean")
# The three components and their plain alternatives (the paper's ablations); the first is ToE's.
INITIALIZATIONS = ("stride", "uniform", "random")
EXPANSIONS = ("farthest", "random", "none")
MERGINGS = ("mean", "drop")
# how a distance ranks tokens: as a similarity (negated: nearest = most alike, this project's
# default) or as the published code uses it (the raw distance in the place of a similarity)
DISTANCE_RANKS = ("similarity", "published")


# ---------------------------------------------------------------------------------------------
# Schedule arithmetic (pure functions of integers and rates; no tensors)
# ---------------------------------------------------------------------------------------------
def validate_schedule(
    expansion_step: Sequence[int],
    keep_rate: Sequence[float],
    initialization_keep_rate: float,
    expansion_multiple_stage: int,
) -> None:
    """Raise ``ValueError`` naming the bad value if the ToE schedule is not usable."""
    steps, rates = list(expansion_step), list(keep_rate)
    if not steps or not rates:
        raise ValueError("expansion_step and keep_rate must each list at least one stage")
    if len(steps) != len(rates):
        raise ValueError(
            f"expansion_step has {len(steps)} entries {steps} but keep_rate has {len(rates)} "
            f"{rates}: give one keep rate per stage"
        )
    for step in steps:
        if isinstance(step, bool) or not float(step).is_integer() or step < 0:
            raise ValueError(f"expansion_step {steps} must be non-negative whole epochs; got {step!r}")
    for prev, cur in zip(steps, steps[1:]):
        if cur <= prev:
            raise ValueError(f"expansion_step {steps} must be strictly increasing ({prev} then {cur})")
    for rate in rates:
        if not (0.0 < rate <= 1.0):
            raise ValueError(f"keep_rate {rates} must lie in (0, 1]; got {rate!r}")
    for prev, cur in zip(rates, rates[1:]):
        if cur < prev:
            raise ValueError(f"keep_rate {rates} must not decrease ({prev} then {cur})")
    if not (0.0 < initialization_keep_rate <= rates[0]):
        raise ValueError(
            f"initialization_keep_rate {initialization_keep_rate!r} must lie in (0, first keep rate "
            f"{rates[0]}]"
        )
    if isinstance(expansion_multiple_stage, bool) or int(expansion_multiple_stage) != expansion_multiple_stage \
            or expansion_multiple_stage < 1:
        raise ValueError(
            f"expansion_multiple_stage (repetition steps) must be an integer >= 1; got {expansion_multiple_stage!r}"
        )


def stage_of_epoch(epoch: float, expansion_step: Sequence[int]) -> int:
    """Stage at ``epoch``: the number of stage starts <= epoch (0 = before the first stage)."""
    return bisect.bisect_right(list(expansion_step), epoch)


def expansion_plan(
    num_patches: int,
    stage: int,
    keep_rate: Sequence[float],
    initialization_keep_rate: float,
    expansion_multiple_stage: int,
) -> Tuple[int, List[int]]:
    """The published integer rules: ``(seed count, tokens added by each repetition step)``.

    Seeds: ``int(P * r0)`` (at least 1, where the published code would select nothing and
    crash). Stage t < S adds ``int(P * (k_t - k_{t-1}))`` with ``k_0 = r0``; the last stage S adds
    ``int(P * k_S) - int(P * (r0 + sum of the earlier deltas))`` so that it lands on k_S exactly.
    Each stage's count is split over ``expansion_multiple_stage`` steps, ``n // k`` each and the
    remainder in the last one. All stages 1..stage are replayed, in order.
    """
    rates = list(keep_rate)
    num_stages = len(rates)
    r0 = initialization_keep_rate
    seeds = max(1, int(num_patches * r0))
    deltas = [rates[0] - r0] + [rates[i] - rates[i - 1] for i in range(1, num_stages)]
    steps: List[int] = []
    for t in range(1, min(stage, num_stages) + 1):
        if t == num_stages:
            added = int(num_patches * rates[-1]) - int(num_patches * (r0 + sum(deltas[: num_stages - 1])))
        else:
            added = int(num_patches * deltas[t - 1])
        per_step = added // expansion_multiple_stage
        steps += [per_step] * (expansion_multiple_stage - 1)
        steps.append(added - per_step * (expansion_multiple_stage - 1))
    # Guard against configurations whose rounding would ask for more tokens than exist.
    room = num_patches - seeds
    clipped = []
    for m in steps:
        m = max(0, min(m, room))
        room -= m
        clipped.append(m)
    return seeds, clipped


def is_reducing_stage(stage: int, keep_rate: Sequence[float]) -> bool:
    """Whether ``stage`` trains on fewer than all tokens (stage 0 and a final 1.0 stage do not)."""
    rates = list(keep_rate)
    if stage <= 0:
        return False
    return not (stage >= len(rates) and rates[-1] >= 1.0)


def kept_tokens_per_stage(
    num_patches: int,
    keep_rate: Sequence[float],
    initialization_keep_rate: float,
    expansion_multiple_stage: int = 2,
) -> List[int]:
    """Patch tokens kept in each stage 1..S (``num_patches`` where ToE is off).

    >>> kept_tokens_per_stage(196, [0.5, 0.75, 1.0], 0.25)
    [98, 147, 196]
    """
    kept = []
    for stage in range(1, len(keep_rate) + 1):
        if not is_reducing_stage(stage, keep_rate):
            kept.append(num_patches)
            continue
        seeds, steps = expansion_plan(num_patches, stage, keep_rate, initialization_keep_rate,
                                      expansion_multiple_stage)
        kept.append(seeds + sum(steps))
    return kept


def seed_positions(num_patches: int, initialization_keep_rate: float, initialization: str = "stride",
                   grid_size: Optional[Tuple[int, int]] = None, count: Optional[int] = None) -> List[int]:
    """Positions (0..P-1) of the seed tokens (``count`` of them; default ``int(P * r0)``, at least 1).

    ``"stride"``, the published rule: ``stride = int(1 // r0)`` (float floor division, so
    ``1 // 0.2 == 4.0``) and the first ``int(P * r0)`` multiples of the stride. For r0 = 0.2 or
    0.4 this leaves the last ~20 % of the image without seeds.

    ``"uniform"``: a lattice of about ``gh x gw`` points over the (H, W) patch grid with the
    grid's aspect ratio, cell centres in each direction, thinned evenly to exactly ``int(P*r0)``
    points. ``grid_size`` defaults to a square grid when P is a square, else one row of P.
    """
    count = max(1, int(num_patches * initialization_keep_rate)) if count is None else count
    if initialization == "random":
        raise ValueError("initialization='random' draws the seeds of every sample anew in TokenSelect: "
                         "there are no fixed seed positions")
    if initialization == "stride":
        stride = int(1 // initialization_keep_rate)
        return list(range(0, num_patches, stride))[:count]
    if initialization != "uniform":
        raise ValueError(f"initialization must be one of {INITIALIZATIONS}; got {initialization!r}")
    if grid_size is None or grid_size[0] * grid_size[1] != num_patches:
        side = math.isqrt(num_patches)
        grid_size = (side, side) if side * side == num_patches else (1, num_patches)
    height, width = grid_size
    rows = min(height, max(1, round(math.sqrt(count * height / width))))
    cols = min(width, math.ceil(count / rows))
    rows = min(height, math.ceil(count / cols))
    row_pos = [int((i + 0.5) * height / rows) for i in range(rows)]
    col_pos = [int((j + 0.5) * width / cols) for j in range(cols)]
    lattice = [r * width + c for r in row_pos for c in col_pos]
    # Thin the lattice evenly (in raster order) down to exactly `count` points.
    return [lattice[int((t + 0.5) * len(lattice) / count)] for t in range(count)]


# ---------------------------------------------------------------------------------------------
# FLOP arithmetic
# ---------------------------------------------------------------------------------------------
def vit_step_flops(
    num_patches: int,
    embed_dim: int,
    depth: int,
    kept_patches: Optional[int] = None,
    num_prefix_tokens: int = 1,
    mlp_ratio: float = 4.0,
    patch_dim: int = 0,
    num_classes: int = 0,
    training: bool = True,
) -> float:
    """FLOPs (2 per multiply-add) of one ViT step for one sample, attention products included.

    A block on N tokens of width d costs ``2 * (4 + 2 * mlp_ratio) * N * d^2`` (qkv, projection,
    MLP) plus ``4 * N^2 * d`` (q @ k^T and attn @ v). Block 0 runs on all ``P + prefix`` tokens,
    blocks 1..depth-1 on ``kept_patches + prefix``. ``patch_dim`` (in_chans * patch^2) and
    ``num_classes`` add the patch embedding and the head. A training step (forward + backward)
    is 3x the forward.
    """
    def block(n: int) -> float:
        return 2.0 * (4.0 + 2.0 * mlp_ratio) * n * embed_dim ** 2 + 4.0 * n * n * embed_dim

    kept = num_patches if kept_patches is None else kept_patches
    full_len = num_patches + num_prefix_tokens
    kept_len = kept + num_prefix_tokens
    forward = block(full_len) + (depth - 1) * block(kept_len)
    forward += 2.0 * num_patches * patch_dim * embed_dim + 2.0 * embed_dim * num_classes
    return 3.0 * forward if training else forward


def schedule_flops(
    epochs: int,
    num_patches: int,
    embed_dim: int,
    depth: int,
    expansion_step: Sequence[int],
    keep_rate: Sequence[float],
    initialization_keep_rate: float,
    expansion_multiple_stage: int = 2,
    **flop_kwargs,
) -> Tuple[float, float]:
    """``(ToE FLOPs, full-token FLOPs)`` of a whole run, per training sample seen per epoch."""
    kept = kept_tokens_per_stage(num_patches, keep_rate, initialization_keep_rate, expansion_multiple_stage)
    full = vit_step_flops(num_patches, embed_dim, depth, **flop_kwargs)
    toe = 0.0
    for epoch in range(epochs):
        stage = stage_of_epoch(epoch, expansion_step)
        kept_patches = kept[stage - 1] if stage >= 1 else num_patches
        toe += vit_step_flops(num_patches, embed_dim, depth, kept_patches=kept_patches, **flop_kwargs)
    return toe, full * epochs


def ideal_speedup(*args, **kwargs) -> float:
    """FLOP-ideal speedup of a whole run (arguments as ``schedule_flops``)."""
    toe, full = schedule_flops(*args, **kwargs)
    return full / toe


# ---------------------------------------------------------------------------------------------
# The operator
# ---------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the selection and the merge sum are computed in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` (a no-op on devices without autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class TokenSelect(nn.Module):
    """Token Expansion's "initialization, expansion, merging" operator.

    Args (the published ones first):
        expansion_step: epoch at which each stage starts, strictly increasing (e.g. [0, 100, 200]).
        keep_rate: fraction of patch tokens kept in each stage, non-decreasing, in (0, 1].
        initialization_keep_rate: fraction of seed tokens r0, in (0, keep_rate[0]].
        expansion_multiple_stage: repetition steps k per stage (>= 1).
        distance: ``"cosine"`` (published default), ``"manhattan"`` or ``"euclidean"``. Expansion
            always adds the tokens LEAST like (farthest from) everything kept and merging goes to
            the MOST similar (nearest) kept token. The published code takes the max and an
            ascending sort of the raw distance for manhattan/euclidean, which inverts that
            meaning; here distances are negated into similarities so all three agree. Cosine
            compares L2-normalised tokens, the distances compare raw tokens.
        initialization: ``"stride"`` (published seed rule, default) or ``"uniform"`` (seeds
            spread over the whole 2-D grid; see ``seed_positions``); ``"random"`` for the ablation.
        expansion, merging, distance_rank: the paper's ablations, each ToE's own by default; see
            "Ablations" below.
        num_prefix_tokens: leading tokens that pass through untouched and are never merged into
            (1 = class token, 2 = class + distillation token). ``attach`` sets it from the model.
        num_suffix_tokens: trailing tokens handled the same way (YOLOS detection tokens).
        grid_size: (H, W) patch grid, used by ``initialization="uniform"`` (square if omitted).
        sparse_inference: reduce in eval mode too (published attribute; off by default).

    ``token_select(x)`` (also ``forward``) takes x (B, N, C) and returns ``(x_out, index)``:
    x_out (B, prefix + K + suffix, C) with the prefix tokens, the kept tokens in selection order
    (seeds first, then tokens in the order added), each the mean of itself and the tokens merged
    into it, then the suffix tokens; ``index`` (B, prefix + K + suffix) int64, the input position
    of every output token. When it does not reduce (eval mode, stage 0, a final stage of 1.0) it
    returns ``(x, None)`` with x unchanged.

    Ablations. ToE is "initialization, expansion, merging": seed tokens spread over the image, then
    grown stage by stage with the tokens least like anything kept, and every token left out merged
    into the kept token it is most like. Each component can be replaced by its plain alternative,
    so an ablation changes one choice and keeps the token counts of every stage:
        initialization="random": the seeds of each sample are a random subset of its patches.
        expansion="random": each repetition step adds random unselected tokens, not the farthest.
        expansion="none": no expansion: all the stage's kept tokens are placed by the
            initialization rule at the stage's keep rate (the stride rule at rate K/P, the uniform
            lattice of K points, or K random patches).
        merging="drop": the unselected tokens are dropped instead of averaged into the kept ones.
        distance_rank="published": manhattan/euclidean rank tokens as the published code does, by
            the raw distance in the place of a similarity (expansion then adds the tokens whose
            nearest kept token is nearest, and merging goes to the farthest kept token). Cosine is
            the same either way.
    Random choices use torch's generator of the input's device, as dropout does.

    Precision: the selection (similarities, expansion order, merge targets) and the merge sum are
    computed in float32 (float64 for float64 input) with autocast off, so the kept tokens do not
    depend on the input dtype or the autocast precision; x_out has x's dtype and gradient path.
    """

    reducer = "toe"  # which choice of tokens (the baselines of make_reducer replace _choose)

    def __init__(
        self,
        expansion_step: Sequence[int] = (0, 100, 200),
        keep_rate: Sequence[float] = (0.5, 0.75, 1.0),
        initialization_keep_rate: float = 0.25,
        expansion_multiple_stage: int = 2,
        distance: str = "cosine",
        initialization: str = "stride",
        expansion: str = "farthest",
        merging: str = "mean",
        distance_rank: str = "similarity",
        num_prefix_tokens: int = 1,
        num_suffix_tokens: int = 0,
        grid_size: Optional[Tuple[int, int]] = None,
        sparse_inference: bool = False,
    ) -> None:
        super().__init__()
        validate_schedule(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
        for name, value, allowed in (("initialization", initialization, INITIALIZATIONS),
                                     ("expansion", expansion, EXPANSIONS), ("merging", merging, MERGINGS),
                                     ("distance_rank", distance_rank, DISTANCE_RANKS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
        if num_prefix_tokens < 0 or num_suffix_tokens < 0:
            raise ValueError("num_prefix_tokens and num_suffix_tokens must be >= 0")
        self.expansion_step = [int(s) for s in expansion_step]
        self.keep_rate = [float(r) for r in keep_rate]
        self.initialization_keep_rate = float(initialization_keep_rate)
        self.expansion_multiple_stage = int(expansion_multiple_stage)
        self.distance = distance
        self.initialization = initialization
        self.expansion = expansion
        self.merging = merging
        self.distance_rank = distance_rank
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_suffix_tokens = int(num_suffix_tokens)
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.sparse_inference = bool(sparse_inference)
        self.current_stage = 0
        self.last_index: Optional[torch.Tensor] = None
        # (num_patches, grid, device) -> seed positions; (num_patches, stage) -> plan. Plain dicts,
        # not buffers, so the host model's state_dict keys do not change.
        self._seed_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._plan_cache: Dict[tuple, Tuple[int, List[int]]] = {}

    def extra_repr(self) -> str:
        return (f"expansion_step={self.expansion_step}, keep_rate={self.keep_rate}, "
                f"initialization_keep_rate={self.initialization_keep_rate}, "
                f"expansion_multiple_stage={self.expansion_multiple_stage}, distance={self.distance!r}, "
                f"initialization={self.initialization!r}, " + "".join(
                    f"{name}={value!r}, " for name, value, default in (
                        ("expansion", self.expansion, "farthest"), ("merging", self.merging, "mean"),
                        ("distance_rank", self.distance_rank, "similarity")) if value != default) +
                f"num_prefix_tokens={self.num_prefix_tokens}, "
                f"current_stage={self.current_stage}")

    # -- schedule ----------------------------------------------------------------------------
    def update_current_stage(self, epoch: float) -> int:
        """Set the stage from the epoch (call before every epoch, and after resuming)."""
        self.current_stage = stage_of_epoch(epoch, self.expansion_step)
        return self.current_stage

    @property
    def reducing(self) -> bool:
        """Whether a forward call in the current mode and stage reduces the sequence."""
        return (self.training or self.sparse_inference) and is_reducing_stage(self.current_stage, self.keep_rate)

    def _plan(self, num_patches: int) -> Tuple[int, List[int]]:
        key = (num_patches, self.current_stage)
        plan = self._plan_cache.get(key)
        if plan is None:
            plan = expansion_plan(num_patches, self.current_stage, self.keep_rate,
                                  self.initialization_keep_rate, self.expansion_multiple_stage)
            self._plan_cache[key] = plan
        return plan

    def kept_patch_tokens(self, num_patches: int) -> int:
        """Patch tokens the current stage keeps in training (``num_patches`` when it does not reduce)."""
        if not is_reducing_stage(self.current_stage, self.keep_rate):
            return num_patches
        seeds, steps = self._plan(num_patches)
        return seeds + sum(steps)

    def kept_in_last_forward(self, num_patches: int) -> int:
        """The patch tokens the last forward really carried after the operator: ``num_patches``
        when it did not reduce (the one rule the trainers count kept tokens by)."""
        if self.last_index is None:
            return num_patches
        return int(self.last_index.shape[1]) - self.num_prefix_tokens - self.num_suffix_tokens

    def prepare(self, num_patches: int, device: torch.device) -> None:
        """Fill the current stage's caches (its plan, its seed positions) outside any forward. A
        compiled model then only ever traces cache hits: one graph per stage, not a second one after
        the first call filled the cache. Call it after ``update_current_stage`` and ``grid_size``."""
        if not is_reducing_stage(self.current_stage, self.keep_rate):
            return
        seeds_count, step_sizes = self._plan(num_patches)
        if self.initialization != "random":
            self._seeds(num_patches, torch.device(device),
                        seeds_count + sum(step_sizes) if self.expansion == "none" else None)

    def _seeds(self, num_patches: int, device: torch.device, count: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(seed positions, the other positions in increasing order), cached per token count;
        ``count`` seeds at the rate ``count / num_patches`` instead of r0 (``expansion="none"``)."""
        key = (num_patches, self.grid_size, self.initialization, str(device), count)
        cached = self._seed_cache.get(key)
        if cached is None:
            rate = self.initialization_keep_rate if count is None else count / num_patches
            positions = seed_positions(num_patches, rate, self.initialization, self.grid_size, count)
            chosen = set(positions)
            rest = [i for i in range(num_patches) if i not in chosen]
            cached = (torch.tensor(positions, dtype=torch.long, device=device),
                      torch.tensor(rest, dtype=torch.long, device=device))
            self._seed_cache[key] = cached
        return cached

    # -- the algorithm -----------------------------------------------------------------------
    def _similarity(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, P) similarity between all patch tokens, without gradient (higher = closer).

        Computed in ``_compute_dtype(patches.dtype)`` with autocast off: bf16 has a spacing of
        2^-8 just below 1, so the cosines of near-parallel tokens collapse into a few values, ties
        and rounding reorder them, and the kept set would depend on the autocast precision. It
        also gives ``torch.cdist`` a dtype it has a kernel for on the CPU (no fp16 or bf16 there).
        """
        with torch.no_grad(), _autocast_off(patches.device):
            tokens = patches.detach().to(_compute_dtype(patches.dtype))   # no copy if already fp32
            if self.distance == "cosine":
                # clamp: an all-zero token (padding) has similarity 0 to everything, not NaN
                tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                return tokens @ tokens.transpose(1, 2)
            p = 1.0 if self.distance == "manhattan" else 2.0
            distance = torch.cdist(tokens, tokens, p=p)
            return distance if self.distance_rank == "published" else -distance

    def token_select(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reduce x (B, N, C) to (B, prefix + K + suffix, C); see the class docstring."""
        if x.dim() != 3:
            raise ValueError(f"TokenSelect expects a (batch, tokens, channels) tensor; got shape {tuple(x.shape)}")
        num_special = self.num_prefix_tokens + self.num_suffix_tokens
        num_patches = x.shape[1] - num_special
        if num_patches <= 0:
            raise ValueError(
                f"TokenSelect got {x.shape[1]} tokens but {self.num_prefix_tokens} prefix and "
                f"{self.num_suffix_tokens} suffix tokens: there are no patch tokens to select from"
            )
        if not self.reducing:
            self.last_index = None
            return x, None
        seeds_count, step_sizes = self._plan(num_patches)
        if seeds_count + sum(step_sizes) >= num_patches:
            self.last_index = None
            return x, None

        batch, _, channels = x.shape
        start, stop = self.num_prefix_tokens, self.num_prefix_tokens + num_patches
        with torch.no_grad():
            selected, unselected, target = self._choose(x, seeds_count, step_sizes)
            kept = selected.shape[1]
            drop = target is None
            # dest[b, n]: the output slot that input token n ends in. Prefix and suffix tokens keep
            # their own slots; a kept patch token has its slot, a merged one its target's. One
            # scatter-add over all N tokens then does the whole merge, and its backward is a
            # single gather of the output gradient: no slices, no zero-filled (B, N, C) buffers.
            num_out = x.shape[1] - num_patches + kept
            # dropped tokens (no target) go to one extra slot, cut off below
            slots_total = num_out + int(drop)
            slots = torch.arange(start, start + kept, device=x.device).expand(batch, -1)
            dest = torch.empty(batch, x.shape[1], dtype=torch.long, device=x.device)
            dest[:, :start] = torch.arange(start, device=x.device)
            dest[:, stop:] = torch.arange(start + kept, num_out, device=x.device)
            patch_dest = dest[:, start:stop]
            patch_dest.scatter_(1, selected, slots)
            patch_dest.scatter_(1, unselected, torch.full_like(unselected, num_out) if drop else target + start)
            compute = _compute_dtype(x.dtype)
            counts = torch.zeros(batch, slots_total, dtype=compute, device=x.device)
            counts.scatter_add_(1, dest, torch.ones_like(dest, dtype=compute))

        # The tokens themselves keep their gradient: a scatter-add mean (a count of 1 for the
        # prefix and suffix tokens, which pass unchanged). The sum is taken in the compute dtype
        # because a few fp16 tokens of ~3e4 already sum past fp16's 65504 to inf; the mean is cast
        # back, so the output has x's dtype. For fp32 (and fp64) input both casts are no-ops.
        summed = torch.zeros(batch, slots_total, channels, dtype=compute, device=x.device)
        summed = summed.scatter_add(1, dest.unsqueeze(-1).expand(-1, -1, channels), x.to(compute))
        out = (summed[:, :num_out] / counts[:, :num_out].unsqueeze(-1)).to(x.dtype)  # (B, prefix+K+suffix, C)
        positions = [torch.arange(start, device=x.device).expand(batch, -1), selected + start,
                     torch.arange(stop, x.shape[1], device=x.device).expand(batch, -1)]
        index = torch.cat(positions, dim=1)                                   # (B, prefix+K+suffix)
        self.last_index = index
        return out, index

    def _choose(self, x: torch.Tensor, seeds_count: int, step_sizes: List[int]
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The choice of tokens, without gradient: ``(selected, unselected, target)``.

        ``selected`` (B, K): the patch positions (0..P-1) that become the K output tokens, in output
        order; ``unselected`` (B, P - K): the other positions; ``target`` (B, P - K): the output slot
        (0..K-1) each unselected token is averaged into, or None to drop them. K is
        ``seeds_count + sum(step_sizes)``. This is ToE's "initialization, expansion, merging"; the
        baseline reducers (``make_reducer``) replace this method only.
        """
        batch = x.shape[0]
        start = self.num_prefix_tokens
        num_patches = x.shape[1] - self.num_prefix_tokens - self.num_suffix_tokens
        patches = x[:, start:start + num_patches]                             # (B, P, C)
        sim = self._similarity(patches)                                       # (B, P, P)
        if self.expansion == "none":  # every kept token placed by the initialization rule
            seeds_count, step_sizes = seeds_count + sum(step_sizes), []
        if self.initialization == "random":
            shuffled = torch.rand(batch, num_patches, device=x.device).argsort(dim=1)
            selected = shuffled[:, :seeds_count].sort(dim=1).values          # (B, S)
            unselected = shuffled[:, seeds_count:].sort(dim=1).values        # (B, U) in order
            seed_rows = selected.unsqueeze(-1).expand(-1, -1, num_patches)
            best = sim.gather(1, seed_rows).amax(dim=1)
        else:
            seeds, rest = self._seeds(num_patches, x.device, seeds_count if self.expansion == "none" else None)
            unselected = rest.unsqueeze(0).expand(batch, -1)              # (B, U) in order
            selected = seeds.unsqueeze(0).expand(batch, -1)               # (B, S)
            # best[b, i]: similarity of token i to its closest selected token. sim is symmetric,
            # so the rows of the selected tokens hold their similarity to every token.
            best = sim[:, seeds].amax(dim=1)                              # (B, P)
        added = [selected]
        for size in step_sizes:
            if self.expansion == "random":
                order = torch.rand(unselected.shape, device=x.device).argsort(dim=1)
            else:
                # Ascending sort of the unselected tokens' best similarity: the least-like first.
                order = best.gather(1, unselected).sort(dim=1, stable=True).indices
            unselected = unselected.gather(1, order)
            new, unselected = unselected[:, :size], unselected[:, size:]
            if size == 0:  # the sort still reorders the unselected tokens, as published
                continue
            added.append(new)
            new_rows = sim.gather(1, new.unsqueeze(-1).expand(-1, -1, num_patches))  # (B, m, P)
            best = torch.maximum(best, new_rows.amax(dim=1))
        selected = torch.cat(added, dim=1)                                # (B, K)
        if self.merging == "drop":
            return selected, unselected, None
        # Merge: each unselected token goes to its most similar selected token.
        rows = sim.gather(1, unselected.unsqueeze(-1).expand(-1, -1, num_patches))   # (B, U, P)
        target = rows.gather(2, selected.unsqueeze(1).expand(-1, rows.shape[1], -1)).argmax(dim=2)
        return selected, unselected, target

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.token_select(x)


# ---------------------------------------------------------------------------------------------
# Baseline reducers: ToE's place and schedule, another choice of tokens
# ---------------------------------------------------------------------------------------------
REDUCERS = ("toe", "random", "topk", "tome")


class _BaselineReducer(TokenSelect):
    """A ``TokenSelect`` whose choice of tokens is a baseline's instead of ToE's.

    Everything but the choice is ToE's: the place (after block 0, through ``attach``), the stage
    schedule and the kept count of every stage (``kept_patch_tokens``, the published integer
    rules), the prefix and suffix tokens passed through untouched, ``reducing``, ``last_index``,
    ``sparse_inference``, identity in eval mode, and the gradient path of the kept tokens (one
    scatter-add mean). Only ``_choose`` differs, so a comparison with ToE changes the tokens and
    nothing else. ``initialization_keep_rate`` and ``expansion_multiple_stage`` only set the kept
    counts (ToE's seed and repetition rules give them); ToE's own options (distance,
    initialization, expansion, merging, distance_rank) do not exist here.
    """

    reducer = ""

    def __init__(
        self,
        expansion_step: Sequence[int] = (0, 100, 200),
        keep_rate: Sequence[float] = (0.5, 0.75, 1.0),
        initialization_keep_rate: float = 0.25,
        expansion_multiple_stage: int = 2,
        num_prefix_tokens: int = 1,
        num_suffix_tokens: int = 0,
        grid_size: Optional[Tuple[int, int]] = None,
        sparse_inference: bool = False,
    ) -> None:
        super().__init__(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage,
                         num_prefix_tokens=num_prefix_tokens, num_suffix_tokens=num_suffix_tokens,
                         grid_size=grid_size, sparse_inference=sparse_inference)

    def extra_repr(self) -> str:
        return (f"reducer={self.reducer!r}, expansion_step={self.expansion_step}, keep_rate={self.keep_rate}, "
                f"initialization_keep_rate={self.initialization_keep_rate}, "
                f"expansion_multiple_stage={self.expansion_multiple_stage}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, current_stage={self.current_stage}")

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens of x (B, P, C), detached, in the compute dtype."""
        stop = x.shape[1] - self.num_suffix_tokens
        return x[:, self.num_prefix_tokens:stop].detach().to(_compute_dtype(x.dtype))


def _split_by_order(order: torch.Tensor, kept: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the first ``kept`` positions of ``order``, the rest), each in increasing position order."""
    return order[:, :kept].sort(dim=1).values, order[:, kept:].sort(dim=1).values


def _unit(tokens: torch.Tensor) -> torch.Tensor:
    # clamp: an all-zero token (padding) has similarity 0 to everything, not NaN
    return tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class RandomReducer(_BaselineReducer):
    """Keep uniformly random patch tokens and drop the rest: PatchDropout (Liu et al., 2022; FLIP),
    at ToE's place and counts. A fresh draw for every image and every forward call, from torch's
    generator of the input's device (as dropout), so a run is reproducible under ``torch.manual_seed``.
    The kept tokens are in increasing position order."""

    reducer = "random"

    def _choose(self, x, seeds_count, step_sizes):
        num_patches = x.shape[1] - self.num_prefix_tokens - self.num_suffix_tokens
        order = torch.rand(x.shape[0], num_patches, device=x.device).argsort(dim=1)
        return (*_split_by_order(order, seeds_count + sum(step_sizes)), None)


class TopKReducer(_BaselineReducer):
    """Keep the patch tokens most similar (cosine) to the class token and drop the rest.

    The cheap stand-in for pruning by the class token's attention scores (EViT, and the top-K
    baseline of "Which Tokens to Use?", ICCVW 2023): fused attention
    (``F.scaled_dot_product_attention``, what timm uses) never forms the attention matrix, so the
    scores are not there to read without giving up the fused kernel; the cosine of each patch
    token with the class token at the output of block 0 ranks the tokens instead, without
    gradient. The class token is the first prefix token; a model without prefix tokens ranks by
    the similarity to the mean patch token. Ties keep the earlier position; the kept tokens are
    in increasing position order.
    """

    reducer = "topk"

    def _choose(self, x, seeds_count, step_sizes):
        with _autocast_off(x.device):
            patches = self._patches(x)
            query = x[:, 0].detach().to(patches.dtype) if self.num_prefix_tokens else patches.mean(dim=1)
            score = (_unit(patches) @ _unit(query).unsqueeze(-1)).squeeze(-1)        # (B, P)
        order = score.argsort(dim=1, descending=True, stable=True)
        return (*_split_by_order(order, seeds_count + sum(step_sizes)), None)


class ToMeReducer(_BaselineReducer):
    """Token Merging (Bolya et al., ICLR 2023) used in training: bipartite soft matching merges
    the patch tokens down to ToE's kept count in one place (after block 0).

    One round: the tokens, in raster order of their positions, alternate between sets A and B;
    each A token finds its most similar B token (cosine), and the ``r`` A tokens with the most
    similar partners are merged into them. Rounds repeat, each merging at most half of the
    tokens, until the kept count is reached (one round for a keep rate of 1/2 or more; a round
    that merges all of A keeps the B tokens, so at a keep rate of exactly 1/2 the content decides
    the groups, not which positions survive). A merged
    token is the size-weighted mean of the tokens it absorbed, i.e. the mean of all the input
    patch tokens in its group, and later rounds compare these means. The output tokens are the
    surviving B (and unmerged A) tokens in raster order; ``last_index`` gives each its own
    position. Prefix and suffix tokens are never merged.

    Departures from ToMe, said plainly: the similarity is the cosine of the tokens themselves at
    the output of block 0 (ToMe uses the attention keys, averaged over heads, which the hook
    after the block does not see), all merging happens at one place instead of r tokens per
    block, and there is no proportional attention (ToMe adds log(size) to the attention logits
    of a merged token; here a merged token counts once in attention, as ToE's merged tokens do).
    """

    reducer = "tome"

    def _choose(self, x, seeds_count, step_sizes):
        batch, device = x.shape[0], x.device
        kept = seeds_count + sum(step_sizes)
        with _autocast_off(device):
            patches = self._patches(x)                                           # (B, P, C)
            num_patches, channels = patches.shape[1], patches.shape[2]
            group = torch.arange(num_patches, device=device).expand(batch, -1)   # (B, P): each patch's token now
            rep = group                                                          # (B, n): each token's position
            features, count = patches, num_patches
            while count > kept:  # static: the counts are Python integers
                merges = min(count - kept, count // 2)
                side_a = torch.arange(0, count, 2, device=device)
                side_b = torch.arange(1, count, 2, device=device)
                unit = _unit(features)
                scores = unit[:, side_a] @ unit[:, side_b].transpose(1, 2)      # (B, |A|, |B|)
                best, partner = scores.max(dim=-1)                               # (B, |A|)
                src = best.argsort(dim=1, descending=True, stable=True)[:, :merges]
                src_pos, dst_pos = side_a[src], side_b[partner.gather(1, src)]   # (B, r) in the current sequence
                merged = torch.zeros(batch, count, dtype=torch.long, device=device).scatter_(1, src_pos, 1)
                # the survivors keep their current (raster) order: sort the merged ones past the end
                survivors = (torch.arange(count, device=device) + count * merged).sort(dim=1).values
                survivors = survivors[:, :count - merges]
                new_id = torch.empty(batch, count, dtype=torch.long, device=device)
                new_id.scatter_(1, survivors, torch.arange(count - merges, device=device).expand(batch, -1))
                new_id.scatter_(1, src_pos, new_id.gather(1, dst_pos))          # a merged token: its partner's
                group, rep, count = new_id.gather(1, group), rep.gather(1, survivors), count - merges
                sizes = torch.zeros(batch, count, dtype=patches.dtype, device=device)
                sizes.scatter_add_(1, group, torch.ones_like(patches[..., 0]))
                sums = torch.zeros(batch, count, channels, dtype=patches.dtype, device=device)
                sums.scatter_add_(1, group.unsqueeze(-1).expand(-1, -1, channels), patches)
                features = sums / sizes.unsqueeze(-1)                            # size-weighted means
        chosen = torch.zeros(batch, num_patches, dtype=torch.long, device=device).scatter_(1, rep, 1)
        unselected = (torch.arange(num_patches, device=device) + num_patches * chosen).sort(dim=1).values
        unselected = unselected[:, :num_patches - kept]
        return rep, unselected, group.gather(1, unselected)


_REDUCER_CLASSES = {"toe": TokenSelect, "random": RandomReducer, "topk": TopKReducer, "tome": ToMeReducer}
# ToE's own options and the values at which a baseline reducer can ignore them (the seed layout
# rule only places ToE's seeds; either rule gives the same kept counts)
_TOE_ONLY = {"distance": ("cosine",), "initialization": ("stride", "uniform"), "expansion": ("farthest",),
             "merging": ("mean",), "distance_rank": ("similarity",)}


def make_reducer(name: str = "toe", **kwargs) -> TokenSelect:
    """The token reducer ``name`` (one of ``REDUCERS``) with ToE's schedule arguments.

    ``toe``: ``TokenSelect(**kwargs)``, the operator as it is. ``random``, ``topk``, ``tome``:
    ``RandomReducer``, ``TopKReducer``, ``ToMeReducer``, subclasses of ``TokenSelect`` that keep
    exactly ToE's tokens per stage at ToE's place and differ only in which tokens they keep.
    The schedule arguments (``expansion_step``, ``keep_rate``, ``initialization_keep_rate``,
    ``expansion_multiple_stage``) and ``num_prefix_tokens``, ``num_suffix_tokens``,
    ``grid_size``, ``sparse_inference`` go to every reducer; ToE's own options (``distance``,
    ``initialization``, ``expansion``, ``merging``, ``distance_rank``) are accepted by a baseline
    only at ToE's values (``initialization`` "stride" or "uniform"), where they change nothing,
    and are otherwise a ``ValueError``.
    """
    if name not in _REDUCER_CLASSES:
        raise ValueError(f"reducer must be one of {REDUCERS}; got {name!r}")
    if name == "toe":
        return TokenSelect(**kwargs)
    for option, ignorable in _TOE_ONLY.items():
        if option in kwargs:
            value = kwargs.pop(option)
            if value not in ignorable:
                raise ValueError(f"{option}={value!r} switches a part of ToE's operator, which the {name!r} reducer "
                                 f"does not have: leave it at its default ({ignorable[0]!r}) or use reducer 'toe'")
    return _REDUCER_CLASSES[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Attaching to an unmodified model: timm, torchvision and Hugging Face transformers ViTs
# ---------------------------------------------------------------------------------------------
class Placement(NamedTuple):
    """Where ToE goes in one model: everything ``attach`` needs to know about its family."""

    family: str                               # "timm", "torchvision" or "transformers:<model_type>"
    blocks: Sequence[nn.Module]               # the transformer blocks, in order
    num_prefix_tokens: int                    # class/distillation/register tokens in front
    grid_size: Optional[Tuple[int, int]]      # (H, W) patch grid, for initialization="uniform"
    mask_args: Tuple[str, ...]                # block arguments that carry an attention mask


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _patch_grid(image_size, patch_size) -> Tuple[int, int]:
    (height, width), (patch_h, patch_w) = _pair(image_size), _pair(patch_size)
    return height // patch_h, width // patch_w


def _attribute_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


# Hugging Face transformers, by ``config.model_type``: where the blocks are (paths tried under the
# model's base model, then under the model; the first is transformers >= 5, the next 4.x), and
# how many prefix tokens the embeddings put in front of the patches (read from the config).
# Their layers return a tensor (>= 5) or a tuple (hidden_states, ...) (4.x); the hook takes both.
_HF_FAMILIES = {
    "vit": (("layers", "encoder.layer"), lambda config: 1),
    "deit": (("layers", "encoder.layer"), lambda config: 2),  # class + distillation token
    "dinov2": (("encoder.layer",), lambda config: 1),
    "dinov2_with_registers": (("encoder.layer",), lambda config: 1 + int(config.num_register_tokens)),
    "clip_vision_model": (("encoder.layers", "vision_model.encoder.layers"), lambda config: 1),
    "clip": (("vision_model.encoder.layers",), lambda config: 1),  # CLIPModel: its vision tower
}
# Heads that put every token back on the patch grid: they cannot take a reduced sequence.
_HF_GRID_HEADS = ("MaskedImageModeling", "Backbone")


def _is_torchvision_vit(model: nn.Module) -> bool:
    """torchvision.models.VisionTransformer or a subclass (checked without importing torchvision)."""
    return any(cls.__name__ == "VisionTransformer" and cls.__module__.startswith("torchvision.")
               for cls in type(model).__mro__)


def placement(model: nn.Module, token_select: Optional[TokenSelect] = None) -> Placement:
    """The blocks, prefix-token count and patch grid of a supported model (see ``attach``).

    One table for every family: timm (``model.blocks``), torchvision (``model.encoder.layers``,
    a class token) and the Hugging Face families of ``_HF_FAMILIES``. Raises ``ValueError``
    naming the model for anything else.
    """
    # timm VisionTransformer (and anything else with timm's layout): unchanged since the first release
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        default_prefix = token_select.num_prefix_tokens if token_select is not None else 1
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return Placement("timm", blocks, int(getattr(model, "num_prefix_tokens", default_prefix)),
                         tuple(int(g) for g in grid) if grid is not None else None, ("attn_mask",))
    # torchvision: class token first; the position embedding is added in encoder.forward
    if _is_torchvision_vit(model):
        return Placement("torchvision", model.encoder.layers, 1,
                         _patch_grid(model.image_size, model.patch_size), ())
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        name = type(model).__name__
        if any(head in name for head in _HF_GRID_HEADS):
            raise ValueError(f"ToE cannot be attached to {name}: its head puts every token back on the patch "
                             f"grid, which a reduced sequence does not fill; attach it to the encoder model")
        if model_type not in _HF_FAMILIES:
            raise ValueError(f"ToE has no placement for the transformers model type {model_type!r} ({name}); "
                             f"supported: {', '.join(sorted(_HF_FAMILIES))}")
        paths, prefix = _HF_FAMILIES[model_type]
        vision_config = getattr(config, "vision_config", None) if model_type == "clip" else config
        roots = [getattr(model, "base_model", model), model]
        for root in roots:
            for path in paths:
                blocks = _attribute_path(root, path)
                if blocks is not None:
                    return Placement(f"transformers:{model_type}", blocks, prefix(vision_config),
                                     _patch_grid(vision_config.image_size, vision_config.patch_size),
                                     ("attention_mask", "causal_attention_mask"))
        raise ValueError(f"ToE found no transformer layers in {name} (looked for {', '.join(paths)}); "
                         f"this transformers version lays the model out differently")
    raise ValueError(f"attach supports timm's VisionTransformer (model.blocks), torchvision's VisionTransformer "
                     f"and the Hugging Face ViT, DeiT, Dinov2 and CLIP vision models; got {type(model).__name__}")


def _mask_positions(block: nn.Module, names: Sequence[str]) -> Tuple[Tuple[str, int], ...]:
    """(name, positional index or -1) of each mask argument of ``block.forward``."""
    try:
        parameters = inspect.signature(block.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    positional = [p.name for p in parameters
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple((name, positional.index(name) if name in positional else -1) for name in names)


def _after_first_block(module: nn.Module, args, kwargs, output):
    """Forward hook on the first block: replace its output by the reduced sequence.

    The block's output is a tensor (timm, torchvision, transformers >= 5) or a tuple whose first
    element is the hidden states (transformers 4.x); the rest of a tuple passes unchanged.
    """
    token_select = module._toe_token_select
    for name, position in module._toe_mask_args:
        mask = kwargs.get(name)
        if mask is None and 0 <= position < len(args):
            mask = args[position]
        if mask is not None and token_select.reducing:
            # The mask is shaped for the full sequence and would not fit the reduced one.
            raise ValueError(f"ToE cannot reduce tokens of a forward pass given an {name}; "
                             f"call it without a mask or put the operator in eval mode")
    if isinstance(output, (tuple, list)):
        reduced, _ = token_select.token_select(output[0])
        return type(output)([reduced, *output[1:]]) if isinstance(output, list) else (reduced, *output[1:])
    reduced, _ = token_select.token_select(output)
    return reduced


# What keeps the blocks after the operator from running on a reduced sequence, found by structure (the
# attributes and modules these designs need), not by model name, so that new timm models built from the
# same parts are caught too: (attribute a submodule holds, or text in a submodule's class name; the reason).
_FULL_GRID_PARTS = (
    (("relative_position_bias_table", "relative_position_index", "rel_pos"), ("RelPos",),
     "its relative-position bias is indexed by the full token grid (BEiT, Swin, vit_relpos_*), so the blocks after "
     "the operator cannot run on a reduced sequence"),
    (("rope",), ("Rotary", "Rope"),
     "its rotary position embeddings are computed for the full token grid (EVA-02, *_rope_*), so the blocks after "
     "the operator cannot run on a reduced sequence"),
    (("rel_indices", "gating_param"), ("GPSA",),
     "its gated positional self-attention lays its position scores over the full token grid (ConViT), so the "
     "blocks after the operator cannot run on a reduced sequence"),
    ((), ("ClassAttn",),
     "its class token joins only in the class-attention layers after model.blocks (CaiT, XCiT): the blocks carry "
     "no class token, so ToE would keep a patch token in its place"),
)


def reduction_problem(model: nn.Module, block_index: int = 0) -> Optional[str]:
    """Why ``model`` cannot run its blocks after ``block_index`` on fewer tokens, or None when it can.

    The model is looked at, not its name: a submodule with a relative-position table, rotary
    embeddings or gated positional attention (each laid over the full token grid), class-attention
    layers (the class token is not in the sequence the blocks see), or a later block whose forward
    needs more than the tokens and a mask (XCiT's blocks take the grid's height and width). A model
    ``placement`` does not know is a ``ValueError``.
    """
    where = placement(model)
    for module in model.modules():
        kind = type(module).__name__
        for attributes, class_parts, reason in _FULL_GRID_PARTS:
            if any(getattr(module, name, None) is not None for name in attributes) or \
                    any(part in kind for part in class_parts):
                return reason
    for block in list(where.blocks)[block_index + 1:]:
        try:
            parameters = list(inspect.signature(block.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            continue
        needed = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in where.mask_args
                  and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if needed:
            return (f"its blocks need more than the tokens ({type(block).__name__}.forward takes "
                    f"{', '.join(needed)}, the full grid's shape)")
    return None


def attach(model: nn.Module, token_select: Optional[TokenSelect] = None, block_index: int = 0) -> TokenSelect:
    """Put ``token_select`` after transformer block ``block_index`` of an unmodified ViT.

    Supported families (``placement`` finds the blocks, the prefix-token count and the patch grid):

    - timm ``VisionTransformer`` (``deit_*``, ``vit_*``, ``deit3_*``, distilled DeiTs): ``model.blocks``,
      prefix ``model.num_prefix_tokens``, grid ``model.patch_embed.grid_size``;
    - torchvision ``torchvision.models.VisionTransformer`` (``vit_b_16`` ...): ``model.encoder.layers``,
      1 prefix token (class);
    - Hugging Face transformers (4.x and 5.x): ``ViTModel``/``ViTForImageClassification`` (1),
      ``DeiTModel``/``DeiTForImageClassification``/``DeiTForImageClassificationWithTeacher``
      (2: class + distillation), ``Dinov2Model``/``Dinov2ForImageClassification`` (1),
      ``Dinov2WithRegistersModel``/``...ForImageClassification`` (1 + ``num_register_tokens``),
      ``CLIPVisionModel``/``CLIPVisionModelWithProjection``/``CLIPForImageClassification``/
      ``CLIPModel``'s vision tower (1); grid ``config.image_size // config.patch_size``. Masked
      image modelling heads and ``*Backbone`` models are refused (they need every token).

    Models whose later blocks cannot run on fewer tokens are refused with a ``ValueError`` naming the
    model and why (``reduction_problem``: relative-position, rotary, gated positional or
    class-attention models such as BEiT, ``vit_relpos_*``, EVA-02, ConViT, CaiT and XCiT), as is a
    ``block_index`` that is not a block of the model (a ``TypeError`` for a non-integer).

    A forward hook on the block replaces its output, so nothing of the model's forward is copied,
    the model keeps its class and its state_dict keys (the operator has no parameters or
    buffers), and it also acts under gradient checkpointing (timm's segments and transformers'
    ``GradientCheckpointingLayer`` call the blocks as modules, and the selection is deterministic,
    so recomputation agrees). In eval mode the hook returns the block's output unchanged: the
    model is bit-identical to the unattached one. A reducing pass given an attention mask
    (timm's ``attn_mask``, transformers' ``attention_mask``) is refused with a ``ValueError``.
    Sets ``model.token_select`` and ``token_select.num_prefix_tokens`` (and ``grid_size`` when
    unset); ``token_select.last_index`` holds the index of the last reduction (None when it did
    not reduce). Returns the operator.
    """
    if token_select is None:
        token_select = TokenSelect()
    if isinstance(block_index, bool) or not isinstance(block_index, int):
        raise TypeError(f"attach: block_index must be an integer, the block after which ToE acts; got {block_index!r}")
    where = placement(model, token_select)
    if not 0 <= block_index < len(where.blocks):  # -1 would silently mean the last block
        raise ValueError(f"attach: block_index {block_index} is not a block of {type(model).__name__}, which has "
                         f"{len(where.blocks)} transformer blocks (0 to {len(where.blocks) - 1}; 0 is the method's "
                         "place)" if where.blocks else f"attach: {type(model).__name__} has no transformer blocks")
    problem = reduction_problem(model, block_index)
    if problem is not None:
        raise ValueError(f"ToE cannot be attached to {type(model).__name__}: {problem}. Use a ViT with absolute "
                         "position embeddings whose blocks see the class token (timm's VisionTransformer: deit_*, "
                         "vit_*, deit3_*)")
    if getattr(model, "_toe_hook", None) is not None:
        detach(model)
    token_select.num_prefix_tokens = where.num_prefix_tokens
    if token_select.grid_size is None and where.grid_size is not None:
        token_select.grid_size = where.grid_size
    block = where.blocks[block_index]
    # Plain attributes on the block (not a submodule) so the block's state_dict is unchanged;
    # the operator is registered once, as model.token_select, to follow train()/eval()/to().
    object.__setattr__(block, "_toe_token_select", token_select)
    object.__setattr__(block, "_toe_mask_args", _mask_positions(block, where.mask_args))
    model.token_select = token_select
    object.__setattr__(model, "_toe_hook", (block, block.register_forward_hook(_after_first_block, with_kwargs=True)))
    return token_select


def detach(model: nn.Module) -> None:
    """Remove an operator put on by ``attach``; the model is the plain model again."""
    hook = getattr(model, "_toe_hook", None)
    if hook is None:
        return
    block, handle = hook
    handle.remove()
    object.__delattr__(block, "_toe_token_select")
    object.__delattr__(block, "_toe_mask_args")
    object.__delattr__(model, "_toe_hook")
    del model.token_select


def patch_size(model: nn.Module) -> int:
    """The side in pixels of the patches of a timm-style model (``model.patch_embed.patch_size``, an
    int or a pair; 1 when the embedding names none): the one rule every trainer reads it by."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch or 1)
