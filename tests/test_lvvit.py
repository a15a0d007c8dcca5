"""Tests of the LV-ViT trainer (ToE/lvvit): models, ToE in LV-ViT, token-label data, loss, generator,
main.py end to end (resume, user errors). CPU only; end-to-end runs use a 2-block, 32-wide LV-ViT on
16 px images (4 x 4 = 16 patch tokens) and a tiny generated ImageFolder with 8 x 8 label maps.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import token_select
from helpers import ROOT, assert_user_error, load, ok, read_log, run_main
import ToE.lvvit  # noqa: F401  (registers the models)
from ToE.lvvit.labels import (TokenLabelTargets, crop_boxes, encode_label_map, label_path, load_label_map,
                              save_label_map)
from ToE.lvvit.loss import TokenLabelLoss
from ToE.lvvit.model import mixtoken_box, swap_box

MAIN = ROOT / "ToE" / "lvvit" / "main.py"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, MAP = 3, 8, 2, 8
TINY = ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
        "--img-size", "16", "--patch-size", "4", "--crop-pct", "1.0"]
FAST = ["--device", "cpu", "--num_workers", "0", "-b", "4", "--no-pin-mem", "--warmup-epochs", "0",
        "--cooldown-epochs", "1", "--lr", "1e-3", "--model-ema-decay", "0.9", "--drop-path", "0.1"]
SCHEDULE = ["--expansion-step", "0", "2", "3", "--keep-rate", "0.4", "0.7", "1.0", "--initialization-keep-rate",
            "0.2"]


# -- 1. models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [("lvvit_t", 8_534_720), ("lvvit_s", 26_151_824), ("lvvit_m", 55_830_544),
                                        ("lvvit_l", 150_021_968)])
def test_parameter_counts(name, count):
    with torch.device("meta"):  # the published sizes, without allocating 150 M weights
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_published_state_dict_names():
    with torch.device("meta"):
        model = timm.create_model("lvvit_s")
    state = model.state_dict()
    stem = [f"patch_embed.{layer}.{key}" for layer in ("bn1", "bn2", "bn3")
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    stem += ["patch_embed.conv1.weight", "patch_embed.conv2.weight", "patch_embed.conv3.weight",
             "patch_embed.proj.weight", "patch_embed.proj.bias"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
             "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight",
                "aux_head.bias", *stem, *[f"blocks.{i}.{key}" for i in range(16) for key in block]}
    assert set(state) == expected
    assert tuple(state["pos_embed"].shape) == (1, 197, 384)
    assert tuple(state["patch_embed.proj.weight"].shape) == (384, 64, 8, 8)
    assert tuple(state["blocks.0.attn.qkv.weight"].shape) == (1152, 384)
    assert tuple(state["aux_head.weight"].shape) == (1000, 384)


def _small(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("lvvit_digits", embed_dim=32, depth=2, num_heads=2, stem_dim=8, img_size=16,
                             patch_size=4, **kwargs)


def test_eval_output_is_class_logits_plus_half_max_of_aux():
    model = _small().eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features, _ = model.forward_features(images)
        expected = model.head(features[:, 0]) + 0.5 * model.aux_head(features[:, 1:]).max(1)[0]
        output = model(images)
    assert output.shape == (3, 10)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    # and it differs from the class logits alone (the aux term is really added)
    assert (output - model.head(features[:, 0])).abs().max() > 1e-3


def test_train_outputs_and_mixtoken_unmix():
    model = _small().train()
    torch.manual_seed(3)
    x_cls, x_aux, box = model(torch.randn(4, 3, 16, 16))
    assert x_cls.shape == (4, 10) and x_aux.shape == (4, 16, 10) and len(box) == 4
    x = torch.randn(4, 8, 6, 6)
    for seed in range(20):
        box = mixtoken_box((6, 6), generator=torch.Generator().manual_seed(seed))
        r1, c1, r2, c2 = box.tolist()
        assert 0 <= r1 <= r2 <= 6 and 0 <= c1 <= c2 <= 6
        assert torch.equal(swap_box(swap_box(x, box, False), box, False), x)  # un-mix of a mix is the identity
        channels_last = x.permute(0, 2, 3, 1)
        assert torch.equal(swap_box(swap_box(channels_last, box, True), box, True), channels_last)
    box = (1, 2, 3, 5)
    mixed = swap_box(x, box, False)
    assert torch.equal(mixed[0, :, 1:3, 2:5], x[3, :, 1:3, 2:5]) and torch.equal(mixed[0, :, 0], x[0, :, 0])
    assert torch.equal(swap_box(x, (2, 2, 2, 5), False), x)  # an empty box mixes nothing


# -- 2. ToE in LV-ViT -----------------------------------------------------------------------------
def test_kept_counts_with_published_rates():
    assert token_select.kept_tokens_per_stage(196, [0.4, 0.7, 1.0], 0.2, 2) == [78, 136, 196]
    assert token_select.kept_tokens_per_stage(64, [0.4, 0.7, 1.0], 0.2, 2) == [24, 43, 64]


def test_toe_scatters_kept_tokens_back_and_dropped_positions_give_the_aux_bias():
    model = _small(mix_token=False).train()
    toe = token_select.attach(model, token_select.TokenSelect([0, 1, 2], [0.4, 0.7, 1.0], 0.2, 2))
    toe.update_current_stage(0)
    x_cls, x_aux, _ = model(torch.randn(2, 3, 16, 16))
    kept = token_select.kept_tokens_per_stage(16, [0.4, 0.7, 1.0], 0.2, 2)[0]
    assert toe.last_index.shape == (2, 1 + kept)
    mask = model.dense_mask
    assert mask.shape == (2, 16) and mask.sum(1).tolist() == [kept, kept]
    bias = model.aux_head.bias.detach()
    dropped = x_aux[~mask].detach()
    assert torch.equal(dropped, bias.expand_as(dropped))
    assert (x_aux[mask].detach() - bias).abs().amax(1).min() > 0
    # kept positions: the token selected at grid position p lands at p
    assert torch.equal(mask.nonzero()[:, 1].reshape(2, kept).sort(1).values, (toe.last_index[:, 1:] - 1).sort(1).values)


def test_loss_kept_only_ignores_dropped_positions():
    model = _small(mix_token=False).train()
    toe = token_select.attach(model, token_select.TokenSelect([0, 1, 2], [0.4, 0.7, 1.0], 0.2, 2))
    toe.update_current_stage(0)
    outputs = model(torch.randn(2, 3, 16, 16))
    target = torch.softmax(torch.randn(2, 10, 2 + 16), 1)
    dense_only = dict(dense_weight=1.0, cls_weight=0.0)
    kept = TokenLabelLoss(**dense_only, kept_only=True, model=model)(None, outputs, target)
    everything = TokenLabelLoss(**dense_only, kept_only=False, model=model)(None, outputs, target)
    x_aux, mask = outputs[1], model.dense_mask
    t_aux = target[:, :, 2:].transpose(1, 2)
    per_token = -(t_aux * x_aux.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(kept, per_token[mask].mean())
    torch.testing.assert_close(everything, per_token.mean())


def test_loss_class_target_is_mixed_by_box_area():
    x_cls, x_aux = torch.randn(4, 10), torch.randn(4, 16, 10)
    target = torch.softmax(torch.randn(4, 10, 18), 1)
    box = (0, 0, 2, 2)  # 4 of 16 tokens: lambda' = 0.75
    loss = TokenLabelLoss(dense_weight=0.0)(None, (x_cls, x_aux, box), target)
    t_cls = 0.75 * target[:, :, 1] + 0.25 * target[:, :, 1].flip(0)
    torch.testing.assert_close(loss, -(t_cls * x_cls.log_softmax(-1)).sum(-1).mean())


def test_initial_loss_is_about_two_ln10():
    model = _small().train()
    outputs = model(torch.randn(8, 3, 16, 16))
    _, target = TokenLabelTargets(10, 4, smoothing=0.1)(None, torch.arange(8) % 10)
    loss = TokenLabelLoss()(None, outputs, target)
    assert abs(loss.item() - 2 * math.log(10)) < 0.3


# -- 3. token-label data --------------------------------------------------------------------------
def _full_map(logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) logits of C <= 5 classes -> the (1, 2, 5, H, W) batch the target builder reads."""
    return encode_label_map(logits).float()[None]


def test_full_crop_reproduces_the_softmax_of_the_map_and_flip_mirrors_it():
    logits = torch.randn(5, 8, 8) * 3
    builder = TokenLabelTargets(5, 8, smoothing=0.0)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    dense = builder.dense(_full_map(logits), full)                       # (1, C, 1 + 64), B = 1 works
    torch.testing.assert_close(dense[0, :, 1:].reshape(5, 8, 8), logits.softmax(0), atol=2e-3, rtol=0)
    torch.testing.assert_close(dense[0, :, 0], logits.mean((1, 2)).softmax(0), atol=5e-3, rtol=0)
    flipped = builder.dense(_full_map(logits).flip(4), full)
    torch.testing.assert_close(flipped[0, :, 1:].reshape(5, 8, 8), logits.softmax(0).flip(2), atol=2e-3, rtol=0)


def test_fixed_and_published_crop_coordinates_differ_on_an_asymmetric_box():
    # class 0's logit encodes the column, class 1's the row: the pooled map says where the crop sampled
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    logits = torch.stack([cols, rows, torch.zeros(8, 8), torch.zeros(8, 8) - 1, torch.zeros(8, 8) - 2])
    box = torch.tensor([[0.0, 0.5, 0.5, 0.5]])                          # top 0, left 0.5: the top-right quarter
    fixed = crop_boxes(box, (8, 8), legacy=False)
    legacy = crop_boxes(box, (8, 8), legacy=True)
    torch.testing.assert_close(fixed[0, 1:], torch.tensor([3.5, -0.5, 7.5, 3.5]))   # x from the columns
    torch.testing.assert_close(legacy[0, 1:], torch.tensor([-0.5, 3.5, 3.5, 7.5]))  # x from the rows (swapped)
    from torchvision.ops import roi_align
    pooled_fixed = roi_align(logits[None], fixed, 4, aligned=False)[0]
    pooled_legacy = roi_align(logits[None], legacy, 4, aligned=False)[0]
    assert pooled_fixed[0].min() >= 4 and pooled_fixed[1].max() <= 3    # columns 4-7, rows 0-3: right
    assert pooled_legacy[0].max() <= 3 and pooled_legacy[1].min() >= 4  # mirrored about the diagonal
    builder = TokenLabelTargets(5, 4, smoothing=0.0)
    assert not torch.allclose(builder.dense(_full_map(logits), box),
                              TokenLabelTargets(5, 4, smoothing=0.0, legacy_coords=True).dense(_full_map(logits), box))


def test_targets_layout_and_smoothing():
    maps = torch.stack([_full_map(torch.randn(5, 8, 8))[0] for _ in range(2)])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.4]])
    _, target = TokenLabelTargets(5, 4, smoothing=0.1)(None, (torch.tensor([1, 3]), maps, boxes))
    assert target.shape == (2, 5, 2 + 16)
    torch.testing.assert_close(target.sum(1), torch.full((2, 18), 1 + 0.1 / 5))   # published: 1 + s/C
    assert target[:, :, 0].argmax(1).tolist() == [1, 3]


def test_label_file_round_trip_and_bad_files(tmp_path):
    logits = torch.randn(10, 12, 12)
    path = tmp_path / "labels" / "3" / "0007.pt"
    save_label_map(str(path), logits)
    raw = torch.load(path, weights_only=True)
    assert raw.dtype == torch.float16 and raw.shape == (2, 5, 12, 12)
    top = logits.topk(5, dim=0)
    assert torch.equal(raw[1].long(), top.indices)
    torch.testing.assert_close(raw[0].float(), top.values, atol=1e-2, rtol=1e-3)
    assert torch.equal(load_label_map(str(path), 10), raw.float())
    assert label_path(str(tmp_path / "labels"), "/data/train/3/0007.JPEG") == str(path)
    from ToE.common.errors import UserError
    with pytest.raises(UserError, match="missing"):
        load_label_map(str(tmp_path / "nothing.pt"))
    torch.save(torch.zeros(2, 5, 12, 12), tmp_path / "f32.pt")
    with pytest.raises(UserError, match="not a float16"):
        load_label_map(str(tmp_path / "f32.pt"))
    with pytest.raises(UserError, match="outside"):
        load_label_map(str(path), 3)


def test_labelled_translate_moves_the_map_with_the_image():
    from ToE.lvvit.labels import _warp_map
    import timm.data.auto_augment as aa
    image = np.zeros((32, 32), np.uint8)
    image[4:8, 4:8] = 255                                                # bright block in map cell (1, 1)
    label_map = torch.zeros(2, 5, 8, 8)
    label_map[0, 0, 1, 1] = 1.0
    # -0.25: the content moves right by a quarter of the frame (8 px, 2 map cells)
    moved = aa.translate_x_rel(Image.fromarray(image), -0.25, resample=Image.NEAREST, fillcolor=0)
    warped = _warp_map(label_map, "TranslateXRel", (-0.25,))
    bright = np.argwhere(np.asarray(moved) > 0)
    cell = torch.nonzero(warped[0, 0])
    assert cell.tolist() == [[1, 3]]
    assert len(bright) == 16 and (bright // 4 == np.array([1, 3])).all()   # the block sits in that cell


# -- generator ------------------------------------------------------------------------------------
def run(*args, module=None, timeout=240):
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(MAIN)]
    return run_main(*args, timeout=timeout, cmd=cmd)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((32, 32, 3)) * 90 + 80 * c).astype(np.uint8)).save(folder / f"{i}.png")
    labels = root.parent / "labels"
    generator = torch.Generator().manual_seed(0)
    for c in range(CLASSES):
        for i in range(TRAIN_PER_CLASS):
            save_label_map(str(labels / f"class{c}" / f"{i}.pt"), torch.randn(CLASSES, MAP, MAP, generator=generator))
    return root, labels


@pytest.mark.e2e
def test_generator_writes_the_published_format(data, tmp_path):
    root, _ = data
    checkpoint = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    teacher = timm.create_model("digits_cnn", num_classes=CLASSES)
    torch.save(teacher.state_dict(), checkpoint)
    out = tmp_path / "generated"
    result = ok(run("--model", "digits_cnn", "--checkpoint", checkpoint, "--data-path", root, "--out", out,
                    "--img-size", 32, "-b", 5, "--device", "cpu", "--num-workers", 0,
                    module="ToE.lvvit.generate_label"))
    assert f"wrote {CLASSES * TRAIN_PER_CLASS} token-label files (8 x 8 maps)" in result.stdout
    files = sorted(out.rglob("*.pt"))
    assert len(files) == CLASSES * TRAIN_PER_CLASS
    value = torch.load(files[0], weights_only=True)
    assert value.dtype == torch.float16 and value.shape == (2, 5, 8, 8)
    # the dense logits are the classifier at every position of the teacher's features
    image = Image.open(root / "train" / "class0" / "0.png").convert("RGB")
    from ToE.lvvit.generate_label import dense_teacher_logits
    from torchvision import transforms as T
    x = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(image))[None]
    expected = dense_teacher_logits(teacher.eval(), x)[0]
    stored = torch.load(out / "class0" / "0.pt", weights_only=True)
    assert torch.equal(stored[1, 0].long(), expected.argmax(0))
    # a checkpoint that does not fit the teacher
    assert_user_error(run("--model", "lvvit_digits", "--checkpoint", checkpoint, "--data-path", root, "--out",
                          tmp_path / "x", "--device", "cpu", module="ToE.lvvit.generate_label"),
                      str(checkpoint), "does not fit lvvit_digits")
    assert_user_error(run("--model", "digits_cnn", "--checkpoint", checkpoint, "--data-path", tmp_path / "none",
                          "--out", tmp_path / "x", "--device", "cpu", module="ToE.lvvit.generate_label"),
                      "does not exist")
    # an existing label set is not replaced in silence
    before = (out / "class0" / "0.pt").read_bytes()
    again = ["--model", "digits_cnn", "--checkpoint", checkpoint, "--data-path", root, "--out", out, "--img-size", 40,
             "-b", 5, "--device", "cpu", "--num-workers", 0]
    assert_user_error(run(*again, module="ToE.lvvit.generate_label"), str(out), "--overwrite")
    assert (out / "class0" / "0.pt").read_bytes() == before
    ok(run(*again, "--overwrite", module="ToE.lvvit.generate_label"))
    assert torch.load(out / "class0" / "0.pt", weights_only=True).shape == (2, 5, 10, 10)


@pytest.mark.e2e
def test_images_that_would_share_a_label_file_are_refused(data, tmp_path):
    """img.0.png and img.1.png share the label file img.pt: the generator would write it twice (and
    count two files) and training would read one image's labels for both."""
    import shutil

    root, labels = data
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    for name in ("img.0.png", "img.1.png"):
        shutil.copy(copy / "train" / "class0" / "0.png", copy / "train" / "class0" / name)
    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("digits_cnn", num_classes=CLASSES).state_dict(), teacher)
    result = run("--model", "digits_cnn", "--checkpoint", teacher, "--data-path", copy, "--out", tmp_path / "gen",
                 "--img-size", 32, "--device", "cpu", "--num-workers", 0, module="ToE.lvvit.generate_label")
    assert_user_error(result, "img.0.png", "img.1.png", "Rename one")
    assert not (tmp_path / "gen").exists()
    args = _common(data, tmp_path / "out")
    args[args.index("--data-path") + 1] = copy
    assert_user_error(run(*args), "img.0.png", "img.1.png")


@pytest.mark.parametrize("damage", ["size", "truncated"])
@pytest.mark.e2e
def test_every_label_file_is_checked_before_training(data, tmp_path, damage):
    """A label map of another size, or a truncated file, that is not the first one was met mid-epoch."""
    import shutil

    root, labels = data
    copy = tmp_path / "labels"
    shutil.copytree(labels, copy)
    bad = copy / "class2" / "5.pt"
    if damage == "size":
        save_label_map(str(bad), torch.randn(CLASSES, MAP // 2, MAP // 2))
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    args = _common(data, tmp_path / "out")
    args[args.index("--token-label-data") + 1] = copy
    result = run(*args)
    assert_user_error(result, str(bad), "4 x 4 map" if damage == "size" else "unreadable")
    assert not (tmp_path / "out").exists()


# -- main.py end to end ---------------------------------------------------------------------------
def _common(data, out):
    root, labels = data
    return ["--data-path", root, "--output_dir", out, "--epochs", 3, *TINY, *FAST, *SCHEDULE, "--token-label",
            "--token-label-data", labels, "--token-label-size", 4]


@pytest.mark.e2e
def test_resume_2_plus_2_equals_4_straight(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = ok(run(*_common(data, straight)))
    kept = token_select.kept_tokens_per_stage(16, [0.4, 0.7, 1.0], 0.2, 2)
    assert kept == [6, 10, 16] and f"keeping {kept} patch tokens" in result.stdout
    log = read_log(straight)
    assert [r["kept_tokens"] for r in log] == [6, 6, 10, 16]
    ok(run(*_common(data, resumed), "--stop-after-epochs", 2))
    assert load(resumed / "checkpoint.pth")["epoch"] == 1
    ok(run(*_common(data, resumed), "--resume", resumed / "checkpoint.pth"))
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 3
    for what in ("model", "model_ema"):
        assert a[what].keys() == b[what].keys()
        for key in a[what]:
            assert torch.equal(a[what][key], b[what][key]), (what, key)
    for ra, rb in zip(log, read_log(resumed)):
        for key in ("stage", "kept_tokens", "train_loss", "lr", "test_loss", "test_acc1", "ema_acc1"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    # --epochs 3 --cooldown-epochs 1: cosine over 3 epochs, then the minimum lr in a 4th (timm's convention)
    assert len(log) == 4 and log[2]["lr"] > 1e-5 and log[3]["lr"] == pytest.approx(1e-5)


@pytest.mark.e2e
def test_error_missing_label_file(data, tmp_path):
    root, labels = data
    partial = tmp_path / "labels"
    for c in range(CLASSES):
        (partial / f"class{c}").mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            if (c, i) != (1, 5):
                (partial / f"class{c}" / f"{i}.pt").write_bytes((labels / f"class{c}" / f"{i}.pt").read_bytes())
    args = _common(data, tmp_path / "out")
    args[args.index("--token-label-data") + 1] = partial
    assert_user_error(run(*args), str(partial / "class1" / "5.pt"), "missing")
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.e2e
def test_error_wrong_label_size_and_dtype(data, tmp_path):
    args = _common(data, tmp_path / "out")
    args[args.index("--token-label-size") + 1] = 14
    assert_user_error(run(*args), "--token-label-size 14", "--token-label-size 4")
    root, labels = data
    bad = tmp_path / "bad"
    for c in range(CLASSES):
        (bad / f"class{c}").mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            torch.save(torch.zeros(2, 5, MAP, MAP), bad / f"class{c}" / f"{i}.pt")   # float32: wrong dtype
    args = _common(data, tmp_path / "out2")
    args[args.index("--token-label-data") + 1] = bad
    assert_user_error(run(*args), str(bad / "class0" / "0.pt"), "not a float16")


def test_labelled_rotate_moves_the_map_with_the_image():
    from ToE.lvvit.labels import _warp_map
    import timm.data.auto_augment as aa
    image = np.zeros((32, 32), np.uint8)
    image[4:8, 4:8] = 255                                                # bright block in map cell (1, 1)
    label_map = torch.zeros(2, 5, 8, 8)
    label_map[0, 0, 1, 1] = 1.0
    # 90 degrees counter-clockwise about the centre: cell (row 1, col 1) goes to (row 6, col 1)
    moved = aa.rotate(Image.fromarray(image), 90, resample=Image.NEAREST, fillcolor=0)
    warped = _warp_map(label_map, "Rotate", (90,))
    assert torch.nonzero(warped[0, 0]).tolist() == [[6, 1]]
    bright = np.argwhere(np.asarray(moved) > 0)
    assert len(bright) == 16 and (bright // 4 == np.array([6, 1])).all()


def test_recipe_defaults_and_published_flag_names():
    from ToE.lvvit.main import parse_args
    args = parse_args([])
    assert (args.model, args.epochs, args.cooldown_epochs, args.lr, args.unscale_lr) == ("lvvit_s", 300, 10, 1.6e-3,
                                                                                         True)
    assert (args.expansion_step, args.keep_rate, args.initialization_keep_rate) == ([0, 100, 200], [0.4, 0.7, 1.0],
                                                                                    0.2)
    assert (args.mixup, args.cutmix, args.model_ema, args.model_ema_decay) == (0.0, 0.0, True, 0.99992)
    args = parse_args(["-b", "32", "--img-size", "192", "--apex-amp", "--token-label-size", "12", "--dense-weight",
                       "0.5", "--cls-weight", "2", "--no-model-ema"])
    assert (args.batch_size, args.input_size, args.amp_dtype, args.token_label_size) == (32, 192, "float16", 12)
    assert (args.dense_weight, args.cls_weight, args.model_ema) == (0.5, 2.0, False)


@pytest.mark.e2e
def test_error_token_label_without_data_and_unknown_model(data, tmp_path):
    root, _ = data
    args = ["--data-path", root, "--epochs", 2, *TINY, *FAST, "--token-label"]
    assert_user_error(run(*args), "--token-label-data")
    args = ["--data-path", root, "--epochs", 2, *FAST, "--model", "deit_tiny_patch16_224", "--img-size", 16,
            "--patch-size", 4]
    assert_user_error(run(*args), "is not an LV-ViT")


@pytest.mark.e2e
def test_token_label_flags_that_would_be_ignored_are_refused(data, tmp_path):
    """--token-label-data without --token-label trained on class labels alone and said nothing;
    a non-RandAugment --aa with token labels failed mid-run."""
    root, labels = data
    base = ["--data-path", root, "--output_dir", tmp_path / "out", "--epochs", 2, *TINY, *FAST]
    assert_user_error(run(*base, "--token-label-data", labels), "--token-label-data", "--token-label")
    assert_user_error(run(*base, "--token-label", "--token-label-data", labels, "--token-label-size", 4, "--aa",
                          "augmix-m5"), "--aa augmix-m5", "RandAugment")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", ["img_size=32", "patch_size=4", "embed_dim=32", "depth=1", "num_heads=2"]),
    ("lvvit_digits", ["embed_dim=32", "depth=1", "num_heads=2", "stem_dim=8"])])
@pytest.mark.e2e
def test_vit_and_lvvit_teachers_write_labels(data, tmp_path, name, kwargs):
    """The README promises ViT and LV-ViT teachers: a ViT needed its sizes (--model-kwargs), an
    LV-ViT's features came as a tuple and failed with a traceback."""
    root, _ = data
    parsed = {k: int(v) for k, v in (item.split("=") for item in kwargs)}
    torch.save(timm.create_model(name, num_classes=CLASSES, **parsed).state_dict(), tmp_path / "teacher.pth")
    out = tmp_path / "labels"
    result = ok(run("--model", name, "--model-kwargs", *kwargs, "--checkpoint", tmp_path / "teacher.pth",
                    "--data-path", root, "--out", out, "--img-size", 32, "--device", "cpu", "--num-workers", 0,
                    module="ToE.lvvit.generate_label"))
    assert f"wrote {CLASSES * TRAIN_PER_CLASS} token-label files (8 x 8 maps)" in result.stdout
    assert load_label_map(str(out / "class0" / "0.pt"), CLASSES).shape == (2, 5, 8, 8)


@pytest.mark.e2e
def test_compiled_lvvit_one_graph_per_stage(data, tmp_path):
    """--torchcompile (aot_eager: the graphs dynamo captures, without C++ code generation) with token
    labels and MixToken (its box drawn as tensors in the graph): the three stages of SCHEDULE compile one
    graph each (tests/test_compile.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ToE.common.lifecycle import Run
    from ToE.lvvit.main import parse_args
    from ToE.lvvit.trainer import LVViTTask

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # (the counter runs on over the tests of this process)
    args = parse_args([str(a) for a in _common(data, tmp_path)] + ["--torchcompile", "aot_eager"])
    Run(args, LVViTTask).fit()
    assert 1 <= counters["stats"]["unique_graphs"] - before <= 3
    timm.create_model("lvvit_digits", embed_dim=32, depth=2, num_heads=2, stem_dim=8, img_size=16, patch_size=4,
                      num_classes=CLASSES).load_state_dict(load(tmp_path / "checkpoint.pth")["model"], strict=True)
