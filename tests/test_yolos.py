"""Tests of the YOLOS detector with ToE (ToE/yolos), on the CPU.

Models are 2-3 block, 32-wide ViTs with 8 px patches; data sets are a few generated canvases in
the COCO layout (tmp folders); the end-to-end runs call ``ToE/yolos/main.py``'s ``cli`` in this
process (exit codes through SystemExit).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import token_select
from helpers import read_log, write_coco
from ToE.yolos.data import CocoDetection, Normalize, RandomSizeCrop, collate, load_coco, yolos_size
from ToE.yolos.evaluation import evaluate, score_detections, to_coco_results
from ToE.yolos.loss import HungarianMatcher, SetCriterion
from ToE.yolos.main import cli
from ToE.yolos.model import (YOLOS, create_backbone, load_init_checkpoint, postprocess, resize_patch_pos_embed,
                             sincos_position_table)
from ToE.common.schedule import stepped_after_epoch
from ToE.yolos.trainer import parameter_groups

BACKBONE = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
TOE = dict(expansion_step=[1, 2, 3], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25,
           expansion_multiple_stage=2)


def _detector(det=5, mid=(32, 32), init=(32, 32), seed=0, classes=4):
    torch.manual_seed(seed)
    return YOLOS(create_backbone(BACKBONE, KWARGS), classes, det, init, mid)


# ---------------------------------------------------------------------------------------------
# The model with ToE
# ---------------------------------------------------------------------------------------------
def test_digits_det_canvases_put_each_digit_on_the_patch_grid():
    """digits-det v2: every digit's 24 px cell starts on the 8 px grid, its tight box lies inside
    that cell, cells do not overlap, 1-3 digits per canvas, labels 1..10."""
    from sklearn.datasets import load_digits

    from ToE.yolos.digits_det import GRID, SCALE, _canvas

    digits = load_digits()
    rng = np.random.RandomState(0)
    counts = []
    for _ in range(60):
        image, boxes = _canvas(rng, digits.images[:100], digits.target[:100])
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and 1 <= len(boxes) <= 3
        cells = [(int(x) // GRID * GRID, int(y) // GRID * GRID) for x, y, _, _, _ in boxes]
        for (x, y, w, h, category), (cx, cy) in zip(boxes, cells):
            assert 1 <= category <= 10 and w > 0 and h > 0
            assert cx <= x and x + w <= cx + 8 * SCALE and cy <= y and y + h <= cy + 8 * SCALE
        assert len(set(cells)) == len(cells)
        counts.append(len(boxes))
    assert set(counts) == {1, 2, 3}


def test_detection_tokens_leave_the_operator_unchanged():
    """Suffix tokens pass through untouched, and the patch selection is the one without them."""
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 36 + 7, 16)
    with_det = token_select.TokenSelect(**TOE, num_suffix_tokens=7).train()
    plain = token_select.TokenSelect(**TOE).train()
    for op in (with_det, plain):
        op.update_current_stage(1)
    out, index = with_det(x)
    ref, ref_index = plain(x[:, :-7])
    assert out.shape == (3, 1 + 18 + 7, 16)
    assert torch.equal(out[:, -7:], x[:, -7:])
    assert torch.equal(index[:, -7:], torch.arange(37, 44).expand(3, -1))
    assert torch.equal(out[:, :-7], ref) and torch.equal(index[:, :-7], ref_index)


@pytest.mark.parametrize("batch", [2, 4])
def test_batch_of_two_with_toe_and_mid_tables_equals_two_batches_of_one(batch):
    """The published mid-table gather fails for B > 1; here B = 2 (and 4) equals B = 1 per image,
    with the sequence reduced, and the backward reaches the mid tables."""
    model = _detector()
    toe = model.attach_toe(token_select.TokenSelect(**TOE))
    toe.update_current_stage(1)
    model.train()
    images = torch.randn(batch, 3, 32, 40, generator=torch.Generator().manual_seed(batch))  # 4 x 5 grid: resized
    both = model(images)
    assert toe.last_index is not None and toe.last_index.shape == (batch, 1 + 10 + 5)
    both["pred_boxes"].sum().backward()
    assert model.mid_pos_embed.grad is not None and model.mid_pos_embed.grad[1].abs().sum() > 0
    single = [model(images[i:i + 1]) for i in range(batch)]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(both[key], torch.cat([s[key] for s in single]), rtol=1e-5, atol=1e-6)
    # and the gather does something: without the operator the outputs differ
    model.eval()
    assert not torch.allclose(model(images)["pred_boxes"], both["pred_boxes"])


def test_mid_table_zero_is_added_before_the_reduction():
    """Published order: block 0, + mid table 0, then ToE. Removing the operator's hook and running
    select(block0(x) + mid0) by hand gives the same blocks-1.. input as the model does."""
    model = _detector()
    toe = model.attach_toe(token_select.TokenSelect(**TOE))
    toe.update_current_stage(1)
    model.train()
    seen = {}
    model.backbone.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    images = torch.randn(2, 3, 32, 32)
    model(images)
    backbone = model.backbone
    x = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([backbone.cls_token.expand(2, -1, -1), x, model.det_token.expand(2, -1, -1)], 1) + model.pos_embed
    token_select.detach(backbone)
    expected, _ = toe(backbone.blocks[0](x) + model.mid_pos_embed[0])
    torch.testing.assert_close(seen["x"], expected)


def test_eval_mode_is_the_full_token_model():
    model = _detector()
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    plain = model(images)["pred_logits"]
    toe = model.attach_toe(token_select.TokenSelect(**TOE))
    toe.update_current_stage(1)
    model.eval()  # the new operator follows the model's mode
    assert torch.equal(model(images)["pred_logits"], plain)
    model.train()
    assert not torch.allclose(model(images)["pred_logits"], plain)


def test_position_table_resized_for_a_new_grid_with_the_same_patch_count():
    torch.manual_seed(0)
    table = torch.randn(1, 4 * 8, 6)
    resized = resize_patch_pos_embed(table, (4, 8), (8, 4))
    reference = F.interpolate(table.reshape(1, 4, 8, 6).permute(0, 3, 1, 2), size=(8, 4), mode="bicubic",
                              align_corners=False).permute(0, 2, 3, 1).reshape(1, 32, 6)
    torch.testing.assert_close(resized, reference)
    assert not torch.allclose(resized, table)
    assert resize_patch_pos_embed(table, (4, 8), (8, 4), by_count=True) is table  # the published skip
    assert resize_patch_pos_embed(table, (4, 8), (4, 8)) is table
    # in the model: a 4 x 4 stored grid and a 2 x 8 batch grid (16 patches both) use a resized table
    model = _detector(init=(32, 32), mid=None)
    stored = model.pos_embed
    used = model._position_table(stored, model.init_grid, (2, 8))
    torch.testing.assert_close(used[:, 1:-5], resize_patch_pos_embed(stored[:, 1:-5], (4, 4), (2, 8)))
    torch.testing.assert_close(used[:, :1], stored[:, :1])


@pytest.mark.parametrize("wrap", ["timm", "deit_checkpoint"])
def test_init_checkpoint_cls_row_kept_and_patch_table_bicubic_resized(tmp_path, wrap):
    torch.manual_seed(1)
    source = create_backbone(BACKBONE, dict(KWARGS, img_size=48))      # a 6 x 6 classification table
    state = source.state_dict()
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.randn(10)
    path = tmp_path / "init.pth"
    torch.save(state if wrap == "timm" else {"model": state, "args": {"model": BACKBONE}, "epoch": 3}, path)
    backbone = create_backbone(BACKBONE, KWARGS)
    load_init_checkpoint(backbone, str(path))
    model = YOLOS(backbone, 4, 5, (32, 40), None)                       # a 4 x 5 detection grid
    torch.testing.assert_close(model.pos_embed[:, :1], state["pos_embed"][:, :1])
    torch.testing.assert_close(model.pos_embed[:, 1:-5], resize_patch_pos_embed(state["pos_embed"][:, 1:], (6, 6),
                                                                                (4, 5)))
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])


def test_init_checkpoint_of_an_average_pooling_classifier_and_sincos_after_it(tmp_path):
    """timm's global_pool="avg" classifiers keep no token norm but fc_norm: it becomes the norm;
    --pos-init-sincos after --init-checkpoint replaces the loaded patch rows, keeps the rest."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    torch.manual_seed(2)
    state = create_backbone(BACKBONE, dict(KWARGS, global_pool="avg")).state_dict()
    assert "norm.weight" not in state and "fc_norm.weight" in state
    state["fc_norm.weight"] = torch.rand_like(state["fc_norm.weight"])
    path = tmp_path / "gap.pth"
    torch.save(state, path)
    backbone = create_backbone(BACKBONE, KWARGS)
    load_init_checkpoint(backbone, str(path))
    torch.testing.assert_close(backbone.norm.weight, state["fc_norm.weight"])
    sincos_position_table(backbone, 2.0)
    torch.testing.assert_close(backbone.pos_embed[0, 1:], 2.0 * build_sincos2d_pos_embed([4, 4], 32))
    torch.testing.assert_close(backbone.pos_embed[0, :1], state["pos_embed"][0, :1])
    torch.testing.assert_close(backbone.blocks[2].attn.qkv.weight, state["blocks.2.attn.qkv.weight"])


def test_sincos_position_table_keeps_the_class_row():
    backbone = create_backbone(BACKBONE, KWARGS)
    cls_row = backbone.pos_embed[:, :1].clone()
    sincos_position_table(backbone, 2.0)
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
    torch.testing.assert_close(backbone.pos_embed[0, 1:], 2.0 * build_sincos2d_pos_embed([4, 4], 32))
    assert torch.equal(backbone.pos_embed[:, :1], cls_row)


# ---------------------------------------------------------------------------------------------
# Matcher and criterion
# ---------------------------------------------------------------------------------------------
def _random_outputs(batch, queries, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=gen),
            "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.25}


def _random_targets(counts, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, classes, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.3} for n in counts]


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force_optimum(seed):
    outputs, targets = _random_outputs(2, 4, 3, seed), _random_targets([3, 2], 3, seed)
    matcher = HungarianMatcher()
    for cost, (rows, cols) in zip(matcher.cost_matrices(outputs, targets), matcher(outputs, targets)):
        queries, boxes = cost.shape
        best = min(sum(cost[q, t].item() for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), boxes))
        assert len(rows) == boxes and len(set(rows.tolist())) == boxes
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_perfect_predictions_give_zero_box_losses_and_weighted_ce():
    classes = 3
    targets = _random_targets([2, 1], classes, 0)
    outputs = _random_outputs(2, 4, classes, 1)
    # queries 1 and 3 of image 0 and query 2 of image 1 hold the targets exactly, with sure classes
    logits = torch.full((2, 4, classes + 1), -20.0)
    logits[..., classes] = 20.0
    for b, slots in enumerate(([1, 3], [2])):
        for slot, box, label in zip(slots, targets[b]["boxes"], targets[b]["labels"]):
            outputs["pred_boxes"][b, slot] = box
            logits[b, slot] = -20.0
            logits[b, slot, label] = 20.0
    outputs["pred_logits"] = logits
    losses = SetCriterion(classes, HungarianMatcher())(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_ce"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    # no-object weight: one matched token predicting "no object" costs 40 nats, weighted 1 of (3 + 5 * 0.1)
    outputs["pred_logits"][1, 2] = logits[0, 0]
    wrong = SetCriterion(classes, HungarianMatcher(cost_class=0.0))(outputs, targets)
    assert wrong["loss_ce"].item() == pytest.approx(40.0 / (3 + 5 * 0.1), rel=1e-4)


def test_num_boxes_is_clamped_at_one():
    criterion = SetCriterion(3, HungarianMatcher())
    assert criterion.num_boxes([{"labels": torch.zeros(0, dtype=torch.int64)}], torch.device("cpu")).item() == 1.0


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------
def test_ground_truth_fed_back_as_predictions_gives_ap_one(tmp_path):
    """GT boxes -> model-shaped outputs (normalised cxcywh, sure logits) -> postprocess -> COCO
    results -> COCOeval: AP 1.0 (an error in any scaling or format would lower it)."""
    root = str(write_coco(tmp_path / "coco"))
    dataset = CocoDetection(root, "val", Normalize())
    queries, classes = 4, dataset.num_classes
    results = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        logits = torch.full((1, queries, classes + 1), -10.0)
        logits[..., classes] = 10.0
        boxes = torch.full((1, queries, 4), 0.5)
        for slot, (box, label) in enumerate(zip(target["boxes"], target["labels"])):
            boxes[0, slot] = box
            logits[0, slot] = -10.0
            logits[0, slot, label] = 10.0
        detections = postprocess({"pred_logits": logits, "pred_boxes": boxes}, target["orig_size"][None])
        results += to_coco_results(detections, [int(target["image_id"])])
    stats, _ = score_detections(dataset.coco, results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(1.0)
    # and a shifted box is not a hit at IoU 0.95: the metric can fail
    for r in results:
        r["bbox"][0] += 2.0
    assert score_detections(dataset.coco, results)[0]["AP"] < 0.9


def test_resize_rule_floors_to_the_patch_and_respects_max_size():
    for width, height in ((640, 480), (480, 640), (500, 375), (1000, 300)):
        for short in (48, 56, 64, 512):
            new_w, new_h = yolos_size(width, height, short, 853, 16)
            assert new_w % 16 == 0 and new_h % 16 == 0 and max(new_w, new_h) <= 853
    assert yolos_size(640, 480, 512, 853, 16) == (672, 512)  # spec example: 512 x 672


def test_crop_drops_boxes_outside_and_collate_pads():
    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1, 2]),
              "area": torch.tensor([16.0, 100.0]), "iscrowd": torch.zeros(2, dtype=torch.int64),
              "size": torch.tensor([32, 32])}
    image = Image.new("RGB", (32, 32))
    crop = RandomSizeCrop(12, 12)
    import random
    random.seed(3)
    _, out = crop(image, target)
    assert all((b[2] > b[0]) and (b[3] > b[1]) for b in out["boxes"].tolist())
    assert len(out["labels"]) == len(out["boxes"]) < 3
    images, targets = collate([(torch.ones(3, 16, 24), {"a": 1}), (torch.ones(3, 24, 8), {"a": 2})])
    assert images.shape == (2, 3, 24, 24) and images[0, :, 16:].abs().sum() == 0 and images[1, :, :, 8:].sum() == 0


def test_lr_per_epoch_and_parameter_groups():
    assert [stepped_after_epoch(e) for e in range(4)] == [0, 0, 1, 2]
    model = _detector()
    groups = parameter_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    head, no_decay, decay = ([names[id(p)] for p in g["params"]] for g in groups)
    assert all(n.startswith(("class_embed", "bbox_embed")) for n in head) and "class_embed.layers.0.bias" in head
    assert {"pos_embed", "det_token", "backbone.cls_token", "backbone.blocks.0.norm1.weight"} <= set(no_decay)
    assert "mid_pos_embed" in decay and "backbone.blocks.0.attn.qkv.weight" in decay
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4]


# ---------------------------------------------------------------------------------------------
# main.py: user errors, resume, --eval json
# ---------------------------------------------------------------------------------------------
TINY = ["--backbone_name", BACKBONE, "--backbone-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()],
        "--det_token_num", "5", "--init_pe_size", "32", "32", "--mid_pe_size", "32", "32",
        "--scales", "24", "32", "40", "--max-size", "56", "--select-scales", "24", "32", "--crop-size", "16", "24",
        "--eval_size", "32", "--device", "cpu", "--num_workers", "0", "--batch_size", "2", "--lr", "1e-3",
        "--epochs", "3", "--expansion-step", "1", "2", "3", "--seed", "0"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return str(write_coco(tmp_path_factory.mktemp("coco")))


def _broken(tmp_path, coco_root, edit):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(coco_root, root)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    edit(root, data)
    path.write_text(json.dumps(data))
    return str(root)


def _set_box(data, value):
    data["annotations"][0]["bbox"][2] = value


@pytest.mark.parametrize("case, expected", [
    ("no_annotations", "annotation file"),
    ("no_images", "image folder"),
    ("missing_image", "names image 0002.png"),
    ("negative_box", "has a box of size -3.0"),
    ("zero_box", "has a box of size 0.0"),
    ("ids_from_0", "has id 0: pycocotools numbers detections from 1"),
    ("duplicate_ids", "annotation id 1 appears twice"),
    ("no_area", "has no area"),
    ("no_file_name", "no 'file_name'"),
    ("empty_val", "lists no images"),
    ("other_categories", "categories (id, name) of"),
    ("category", "category_id 7"),
    ("init_checkpoint", "does not fit the backbone"),
    ("batch", "fewer than one update of 9"),
])
def test_bad_input_is_one_line_exit_2_and_keeps_outputs(tmp_path, coco_root, capsys, case, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    extra = []
    if case == "no_annotations":
        root = _broken(tmp_path, coco_root, lambda r, d: None)
        os.remove(os.path.join(root, "annotations", "instances_val2017.json"))
    elif case == "no_images":
        root = _broken(tmp_path, coco_root, lambda r, d: None)
        import shutil
        shutil.rmtree(os.path.join(root, "train2017"))
    elif case == "missing_image":
        root = _broken(tmp_path, coco_root, lambda r, d: os.remove(r / "train2017" / "0002.png"))
    elif case == "negative_box":
        root = _broken(tmp_path, coco_root, lambda r, d: _set_box(d, -3.0))
    elif case == "zero_box":
        root = _broken(tmp_path, coco_root, lambda r, d: _set_box(d, 0.0))
    elif case == "ids_from_0":
        root = _broken(tmp_path, coco_root, lambda r, d: [a.update(id=a["id"] - 1) for a in d["annotations"]])
    elif case == "duplicate_ids":
        root = _broken(tmp_path, coco_root, lambda r, d: d["annotations"][1].update(id=1))
    elif case == "no_area":
        root = _broken(tmp_path, coco_root, lambda r, d: d["annotations"][2].pop("area"))
    elif case == "no_file_name":
        root = _broken(tmp_path, coco_root, lambda r, d: d["images"][3].pop("file_name"))
    elif case in ("empty_val", "other_categories"):
        root = _broken(tmp_path, coco_root, lambda r, d: None)
        path = os.path.join(root, "annotations", "instances_val2017.json")
        with open(path) as handle:
            val = json.load(handle)
        if case == "empty_val":
            val.update(images=[], annotations=[])
        else:
            val["categories"][1]["name"] = "renamed"
        with open(path, "w") as handle:
            json.dump(val, handle)
    elif case == "category":
        root = _broken(tmp_path, coco_root, lambda r, d: d["annotations"][0].update(category_id=7))
    elif case == "init_checkpoint":
        root = coco_root
        other = create_backbone(BACKBONE, dict(KWARGS, embed_dim=48))
        torch.save(other.state_dict(), tmp_path / "wrong.pth")
        extra = ["--init-checkpoint", str(tmp_path / "wrong.pth")]
    else:
        root = coco_root
        extra = ["--batch_size", "9"]
    code, _, err = _run(TINY + ["--coco_path", root, "--output_dir", str(out)] + extra, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert (out / "keep.txt").read_text() == "precious"


def test_images_without_annotations_are_kept(coco_root):
    dataset = CocoDetection(coco_root, "train", Normalize())
    assert len(dataset) == 8 and len(dataset[0][1]["boxes"]) == 0


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def straight_run(coco_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cli(TINY + ["--coco_path", coco_root, "--output_dir", str(out)])
    return out


@pytest.mark.e2e
def test_resume_equals_an_uninterrupted_run(coco_root, straight_run, tmp_path, capsys):
    """3 epochs straight (stages 0, 1 with mid tables and batch 2, 2) vs 1 epoch, then a resume."""
    out = tmp_path / "resumed"
    cli(TINY + ["--coco_path", coco_root, "--output_dir", str(out), "--stop-after-epochs", "1"])
    cli(TINY + ["--coco_path", coco_root, "--output_dir", str(out), "--resume", str(out / "checkpoint.pth")])
    straight, resumed = _state(straight_run / "checkpoint.pth"), _state(out / "checkpoint.pth")
    assert straight["epoch"] == resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    logs = read_log(out)
    assert [r["epoch"] for r in logs] == [0, 1, 2]
    assert logs[1]["kept_tokens"] < logs[1]["patch_tokens"] and logs[0]["kept_tokens"] == logs[0]["patch_tokens"]


def _eval_json_and_rescore(coco_root, checkpoint, results, capsys, extra=()):
    """--eval with --results-json: (AP printed by the run, AP of the json scored by pycocotools, json)."""
    code, out, err = _run(TINY + ["--coco_path", coco_root, *extra, "--eval", "--resume", str(checkpoint),
                                  "--results-json", str(results)], capsys)
    assert code == 0, err
    printed = float(out.split("AP ")[-1].split(",")[0])
    from pycocotools.cocoeval import COCOeval
    gt = load_coco(os.path.join(coco_root, "annotations", "instances_val2017.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(results)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return printed, evaluator.stats[0], json.loads(results.read_text())


@pytest.mark.e2e
def test_eval_json_scores_the_same_ap_with_pycocotools(coco_root, straight_run, capsys):
    printed, rescored, detections = _eval_json_and_rescore(coco_root, straight_run / "checkpoint.pth",
                                                           straight_run / "dets.json", capsys)
    assert len(detections) == 4 * 5  # every image, every detection token
    assert rescored == pytest.approx(printed, abs=5e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.e2e
def test_toe_training_with_mid_tables_at_batch_size_then_eval_json(coco_root, tmp_path, capsys, batch):
    """End to end at batch 1 and 4 (batch 2: the resume test): epoch 1 trains in ToE stage 1 with
    mid-layer tables on multi-scale batches; --eval at that batch size writes a json whose
    pycocotools AP is the AP the run printed."""
    out = tmp_path / f"batch{batch}"
    sizes = ["--batch_size", str(batch), "--eval-batch-size", str(batch)]
    code, _, err = _run(TINY + ["--coco_path", coco_root, "--output_dir", str(out), *sizes,
                                "--stop-after-epochs", "2"], capsys)
    assert code == 0, err
    logs = read_log(out)
    assert [r["epoch"] for r in logs] == [0, 1]
    assert logs[1]["stage"] == 1 and logs[1]["kept_tokens"] < logs[1]["patch_tokens"]
    assert all(math.isfinite(r["train_loss"]) for r in logs)
    printed, rescored, detections = _eval_json_and_rescore(coco_root, out / "checkpoint.pth", out / "dets.json",
                                                           capsys, extra=sizes)
    assert len(detections) == 4 * 5
    assert rescored == pytest.approx(printed, abs=5e-5)


def test_evaluate_batch_size_does_not_matter_without_padding(coco_root):
    """Same-size val images: scoring with batch 1 or 4 gives the same detections."""
    from torch.utils.data import DataLoader

    from ToE.yolos.data import eval_transform
    model = _detector(det=5, classes=3).eval()
    dataset = CocoDetection(coco_root, "val", eval_transform(32, 53, 8))
    scores = []
    for batch in (1, 4):
        loader = DataLoader(dataset, batch_size=batch, collate_fn=collate)
        stats, results, _ = evaluate(model, None, loader, dataset.coco, torch.device("cpu"))
        scores.append(sorted(round(r["score"], 5) for r in results))
    assert scores[0] == scores[1]


@pytest.mark.e2e
def test_auto_resume_of_a_finished_run_does_nothing(coco_root, straight_run, capsys):
    """The run scripts add --auto-resume: the same command again on a finished run changes nothing."""
    before = (straight_run / "checkpoint.pth").stat().st_mtime_ns
    code, out, err = _run(TINY + ["--coco_path", coco_root, "--output_dir", str(straight_run), "--auto-resume"], capsys)
    assert code == 0 and "nothing to do" in out, err
    assert (straight_run / "checkpoint.pth").stat().st_mtime_ns == before


@pytest.mark.parametrize("tool", ["ToE.common.summary", "ToE.yolos.figure"])
@pytest.mark.e2e
def test_summary_and_figure_of_a_missing_or_empty_run_are_one_line(tool, tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        result = subprocess.run([sys.executable, "-m", tool, str(folder)], capture_output=True, text=True, timeout=120,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0]


@pytest.mark.e2e
def test_eval_sparse_eval_follows_the_checkpoints_own_schedule(coco_root, straight_run, tmp_path, capsys):
    """--eval --sparse-eval reduces as the checkpoint's last epoch did by ITS schedule (steps 1 2 3:
    epoch 2 is stage 2), not by the schedule flags given now (steps 0 5 6 would make it stage 1)."""
    checkpoint = _state(straight_run / "checkpoint.pth")
    torch.save(dict(checkpoint, epoch=2), tmp_path / "epoch2.pth")
    code, out, err = _run(TINY + ["--coco_path", coco_root, "--eval", "--sparse-eval", "--resume",
                                  str(tmp_path / "epoch2.pth"), "--expansion-step", "0", "5", "6"], capsys)
    assert code == 0, err
    assert "sparse evaluation: ToE stage 2" in out


@pytest.mark.e2e
def test_results_json_into_a_new_folder_is_written(coco_root, straight_run, tmp_path, capsys):
    """The detections of a whole evaluation were lost to a missing folder at the very end."""
    target = tmp_path / "new" / "folder" / "detections.json"
    code, out, err = _run(TINY + ["--coco_path", coco_root, "--eval", "--resume", str(straight_run / "checkpoint.pth"),
                                  "--results-json", str(target)], capsys)
    assert code == 0, err
    assert json.loads(target.read_text()) and f"detections in {target}" in out
