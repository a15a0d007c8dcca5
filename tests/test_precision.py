"""Issue 31, numerics: YOLOS's heads in float32 under autocast; a frozen-weight fingerprint that is the
same on every device and in every summation order; one TF32 policy for the trainers and the bench."""

from __future__ import annotations

import copy
import math
import re
import subprocess

import torch
from helpers import ROOT

from ToE.common import distributed
from ToE.common.checkpoint import frozen_checksum, frozen_matches
from ToE.yolos.model import YOLOS, create_backbone


# -- YOLOS: the box and class heads in float32 --------------------------------------------------------------------
def _detector():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=2))
    return YOLOS(backbone, 3, 5, (32, 32), None).eval()


def test_yolos_heads_compute_in_float32_under_bf16_autocast():
    model = _detector()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.forward_features(images)  # the backbone under autocast (its final norm: float32)
        out = model(images)
        in_bf16 = model.bbox_embed(features).sigmoid()  # what the box head gave before: bf16 products
    assert in_bf16.dtype == torch.bfloat16
    assert out["pred_boxes"].dtype == torch.float32 and out["pred_logits"].dtype == torch.float32
    with torch.no_grad():  # the same heads on the same features, in float32 without autocast
        boxes = model.bbox_embed(features.float()).sigmoid()
        logits = model.class_embed(features.float())
    assert torch.equal(out["pred_boxes"], boxes) and torch.equal(out["pred_logits"], logits)
    assert not torch.equal(in_bf16.float(), boxes)  # (the test can tell the two apart)


def test_yolos_heads_follow_their_weights_without_autocast():
    model = _detector().double()
    out = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert out["pred_boxes"].dtype == torch.float64 and out["pred_logits"].dtype == torch.float64


# -- the frozen-weight fingerprint ---------------------------------------------------------------------------------
def _frozen(model: torch.nn.Module, trainable=("head",)) -> torch.nn.Module:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trainable))
    return model


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return _frozen(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(dtype), ("1.",))


def test_the_fingerprint_is_the_weights_not_their_layout_or_place():
    model = _mlp()
    reference = frozen_checksum(model)
    assert reference.startswith("sha256:")
    # the same values stored otherwise (a transposed, non-contiguous tensor; a copy): the same fingerprint
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.data = model[0].weight.detach().t().contiguous().t()
    assert not twin[0].weight.is_contiguous() and frozen_checksum(twin) == reference
    # the trainable weights are no part of it
    with torch.no_grad():
        twin[1].weight.add_(1.0)
    assert frozen_checksum(twin) == reference
    # one frozen weight one float32 step away: another fingerprint
    with torch.no_grad():
        twin[0].weight[0, 0] = torch.nextafter(twin[0].weight[0, 0], torch.tensor(math.inf))
    assert frozen_checksum(twin) != reference
    if torch.cuda.is_available():  # the same weights on the GPU
        assert frozen_checksum(copy.deepcopy(model).cuda()) == reference
    # bfloat16 weights (no NumPy dtype) hash too; nothing frozen: ""
    assert frozen_checksum(_mlp(torch.bfloat16)).startswith("sha256:")
    assert frozen_checksum(_frozen(_mlp(), ("0.", "1."))) == ""


def test_a_sum_depends_on_its_order_the_fingerprint_does_not():
    """Why the sum was replaced: float sums of the same weights in two orders (as a GPU's reduction
    and the CPU's add them) differ in the last bits, and the old check compared them exactly."""
    torch.manual_seed(1)
    model = _frozen(torch.nn.Sequential(torch.nn.Linear(512, 512)), ())
    values = model[0].weight.detach().reshape(-1)
    forward = values.sum(dtype=torch.float32).item()
    backward = values.flip(0).cumsum(0, dtype=torch.float32)[-1].item()
    assert forward != backward  # (the premise)
    permuted = copy.deepcopy(model)
    with torch.no_grad():  # the parameters registered in another order: the fingerprint sorts them by name
        permuted[0]._parameters = dict(reversed(list(permuted[0]._parameters.items())))
    assert [name for name, _ in permuted.named_parameters()] == ["0.bias", "0.weight"]
    assert frozen_checksum(permuted) == frozen_checksum(model)


def test_a_checkpoint_with_the_old_float_sum_still_matches_its_backbone():
    model = _mlp()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    old = float(sum(p.double().sum().item() for p in frozen))  # what checkpoints stored before the hash
    reordered = math.fsum(v for p in reversed(frozen) for v in p.double().reshape(-1).tolist())
    assert frozen_matches(old, model) and frozen_matches(reordered, model)
    assert frozen_matches(frozen_checksum(model), model)
    other = _mlp()
    with torch.no_grad():
        other[0].weight.mul_(1.001)
    assert not frozen_matches(old, other) and not frozen_matches(frozen_checksum(model), other)
    assert not frozen_matches(None, model) and not frozen_matches(1.5, model)


# -- one TF32 policy -------------------------------------------------------------------------------------------------
def test_one_tf32_policy_sets_both_switches():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not distributed.TF32
        distributed.set_float32_policy()
        assert torch.backends.cuda.matmul.allow_tf32 is distributed.TF32
        assert torch.backends.cudnn.allow_tf32 is distributed.TF32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_nothing_else_sets_tf32():
    """The trainers (init_distributed, with the GPU) and the bench (bench/speed.py) apply the policy;
    no other file of the project sets TF32 or the float32 matmul precision."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    setting = re.compile(r"allow_tf32\s*=|set_float32_matmul_precision|fp32_precision\s*=")
    setters = sorted(f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()
                     and setting.search((ROOT / f).read_text()))
    assert setters == ["ToE/common/distributed.py"], setters
    assert "set_float32_policy()" in (ROOT / "bench" / "speed.py").read_text()
    source = (ROOT / "ToE" / "common" / "distributed.py").read_text()
    init = source[source.index("def init_distributed"):]
    assert "set_float32_policy()" in init[:init.index("return DistEnv")]
