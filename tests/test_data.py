"""Data loading and transforms: the default recipe runs, and data that would train wrongly is refused.

Covers ``ToE.common.data`` (posterize at 0 bits, which current Pillow refuses) and
``ToE.common.data`` (one class list for train and val, 16-bit and float images, the val check).
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa

from ToE.common.data import check_images, image_folder, load_rgb, train_val_folders
from ToE.common.errors import UserError
from ToE.common.data import build_train_transform, posterize

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--input-size", "32", "--patch-size", "8", "--no-model-ema", "--batch-size", "32"]
FAST = ["--device", "cpu", "--num_workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--no-pin-mem"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 30, 10


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A few hundred of the embedded digits (real images, 32 px): 30 a class in train, 10 in val."""
    from ToE.common.digits import build_digits

    full = Path(build_digits(str(tmp_path_factory.mktemp("digits_full")), size=32))
    root = tmp_path_factory.mktemp("digits")
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for folder in sorted((full / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def deit_train_transform(data: Path, *argv: str):
    """The training transform exactly as the DeiT trainer builds it from its flags (defaults unless ``argv``)."""
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    args = parse_args(["--data-path", str(data), *TINY, *FAST, *argv])
    task = DeiTTask.__new__(DeiTTask)  # only the data set-up, without a model or outputs
    task.args, task.env = args, types.SimpleNamespace(rank=0, world_size=1)
    train_set, _ = task.build_datasets()
    return train_set.transform


def write_classes(root: Path, split: str, classes, per_class: int = 2, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write_png(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour PNGs): big-endian rows, no filter."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- the default augmentation runs (posterize at 0 bits) ----------------------------------------

def test_posterize_at_zero_bits_gives_the_old_pillow_all_black_image():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    old_pillow_lut = [i & ~(2 ** 8 - 1) for i in range(256)]  # Pillow's mask at bits=0, before it refused 0
    black = posterize(image, 0)
    assert black.mode == "RGB" and black.size == image.size
    assert np.array_equal(np.asarray(black), np.asarray(image.point(old_pillow_lut * 3)))
    assert not np.asarray(black).any()
    for bits in range(1, 8):  # 1 to 7 bits: Pillow's own result, unchanged
        assert np.array_equal(np.asarray(posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert posterize(image, 8) is image


def test_default_policy_at_magnitude_10_posterizes_to_black(digits):
    """The draw that raised: PosterizeIncreasing at level 10 asks for 0 bits and now gives black."""
    transform = deit_train_transform(digits)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", ()) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1 and ops[0].aug_fn is posterize
    op = ops[0]
    assert op.magnitude_std == 0.5  # the policy keeps its magnitude noise
    assert timm_aa.LEVEL_TO_ARG[op.name](10, op.hparams) == (0,)
    at_ten = timm_aa.AugmentOp(op.name, prob=1.0, magnitude=10, hparams={**op.hparams, "magnitude_std": 0})
    at_ten.aug_fn = op.aug_fn
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert not np.asarray(at_ten(image)).any()


def test_default_train_transform_never_raises_on_thousands_of_images(digits):
    """4 seeds x 2,000 images through the DeiT default transform (rand-m9-mstd0.5-inc1, random erasing).

    timm's posterize asks for 0 bits on about 0.15 % of images (2 ops of 15 per image, p 0.5,
    P(N(9, 0.5) >= 10) = 2.3 %); without the fix 8,000 images pass with probability
    exp(-0.0015 * 8000) ~ 6e-6.
    """
    transform = deit_train_transform(digits)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(64)]
    applied = 0
    for seed in range(4):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for i in range(2000):
            out = transform(images[i % len(images)])
            assert out.shape == (3, 32, 32)
            applied += 1
    assert applied == 8000


@pytest.mark.parametrize("policy", ["v0", "rand-m2-mstd0.5", "augmix-m10-mstd0.5"])
def test_other_policies_with_zero_bit_posterize_run(policy):
    """AutoAugment v0 asks for 0 bits outright; plain Posterize at low levels and AugMix around m10 can too."""
    transform = build_train_transform(24, auto_augment=policy)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    random.seed(0)
    np.random.seed(0)
    for _ in range(300):
        transform(image)


def test_bad_policy_is_a_user_error():
    with pytest.raises(UserError, match="--aa 'rand-m9-zz1'"):
        build_train_transform(24, auto_augment="rand-m9-zz1")


@pytest.mark.e2e
def test_one_epoch_with_the_default_recipe_completes(digits, capsys):
    """1 epoch of DeiT with the default augmentation (RandAugment, random erasing, mixup/cutmix, repeated aug).

    256 images a run (the repeated-augmentation sampler's epoch of 300); with timm 1.0.31 and torch
    2.14, seeds 6 and 7 draw a 0-bit posterize in that epoch (2 of seeds 0-9 do), so without the fix
    this test fails; the transform test above is the one that does not depend on the seeds chosen.
    """
    from ToE.deit.main import cli

    for seed in (0, 6, 7):
        cli(["--data-path", str(digits), *TINY, *FAST, "--seed", str(seed)])
        out = capsys.readouterr().out
        assert "300 train / 100 val images" in out and "epoch 0:" in out, out


# -- train and val share one class list -----------------------------------------------------------

def test_class_folders_missing_in_val_are_refused_by_name(tmp_path):
    write_classes(tmp_path, "train", ["cat", "dog", "emu"])
    write_classes(tmp_path, "val", ["cat", "emu"])
    with pytest.raises(UserError, match=r"differ \(missing in val: dog\)\. Give val/ exactly"):
        train_val_folders(str(tmp_path))


def test_class_folders_extra_in_val_are_refused_by_name(tmp_path):
    write_classes(tmp_path, "train", ["cat", "dog"])
    write_classes(tmp_path, "val", ["ant", "cat", "dog", "yak"])
    shutil.rmtree(tmp_path / "val" / "dog")
    with pytest.raises(UserError, match=r"missing in val: dog; extra in val: ant, yak\)"):
        train_val_folders(str(tmp_path))


def test_class_mismatch_is_one_line_before_training(tmp_path, capsys):
    from ToE.deit.main import cli

    write_classes(tmp_path, "train", ["a", "b", "c"], per_class=12)
    write_classes(tmp_path, "val", ["a", "c"])
    with pytest.raises(SystemExit) as exit_info:
        cli(["--data-path", str(tmp_path), *TINY, *FAST])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing in val: b" in lines[0], captured.err
    assert "epoch 0:" not in captured.out


def test_labels_come_from_train_class_list(tmp_path):
    write_classes(tmp_path, "train", ["a", "b", "c"])
    write_classes(tmp_path, "val", ["a", "b", "c"])
    train, val = train_val_folders(str(tmp_path))
    assert val.class_to_idx == train.class_to_idx == {"a": 0, "b": 1, "c": 2}
    # The labels are positions in the list given, not in the folder's own sorted list.
    reordered = image_folder(str(tmp_path), "val", classes=["c", "a", "b"])
    assert {Path(path).parent.name: label for path, label in reordered.samples} == {"c": 0, "a": 1, "b": 2}


# -- image modes ---------------------------------------------------------------------------------

def test_16bit_gray_png_reads_as_its_8bit_version(tmp_path):
    gradient16 = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    gradient8 = (gradient16 / 257).round().astype(np.uint8)
    Image.fromarray(gradient16).save(tmp_path / "g16.png")
    Image.fromarray(gradient8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    read16 = np.asarray(load_rgb(str(tmp_path / "g16.png"))).astype(int)
    read8 = np.asarray(load_rgb(str(tmp_path / "g8.png"))).astype(int)
    assert read16.shape == read8.shape == (48, 64, 3)
    assert np.abs(read16 - read8).max() <= 1
    assert read16.max() == 255 and read16.min() == 0  # not clipped to white


def test_16bit_big_endian_tiff_reads_scaled(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes()).save(tmp_path / "g.tif")
    assert Image.open(tmp_path / "g.tif").mode == "I;16B"
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "g.tif")))[..., 0], values // 257)


def test_mode_i_png_as_older_pillow_opens_it_reads_scaled(tmp_path, monkeypatch):
    """Older Pillow opens 16-bit gray PNGs as mode "I" (current Pillow: "I;16"); same 8-bit result."""
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    Image.fromarray(values).save(tmp_path / "g.png")
    real_open = Image.open

    def open_as_older_pillow(handle):
        image = real_open(handle).convert("I")
        image.format = "PNG"
        return image

    monkeypatch.setattr(Image, "open", open_as_older_pillow)
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "g.png")))[..., 1], values // 257)


@pytest.mark.parametrize("color_type, channels", [(2, 3), (4, 2), (6, 4)])  # RGB, gray+alpha, RGBA
def test_16bit_colour_pngs_read_scaled(tmp_path, color_type, channels):
    ramp = np.linspace(0, 65535, 20 * 10).round().reshape(10, 20)
    pixels = np.stack([ramp, ramp[::-1], ramp.T.reshape(10, 20), ramp][:channels], axis=-1).astype(np.uint16)
    write_png(tmp_path / "c16.png", pixels, color_type)
    read = np.asarray(load_rgb(str(tmp_path / "c16.png"))).astype(int)
    expected = (pixels[..., :3] / 257).round() if channels >= 3 else np.repeat((pixels[..., :1] / 257).round(), 3, -1)
    assert np.abs(read - expected).max() <= 1


@pytest.mark.parametrize("mode, name", [("F", "32-bit float"), ("I", "32-bit integer")])
def test_images_without_known_range_are_refused_by_name(tmp_path, mode, name):
    path = tmp_path / f"x_{mode}.tif"
    Image.new(mode, (8, 8), 1000).save(path)
    with pytest.raises(UserError, match=f"{re.escape(str(path))} has mode {mode} \\({name}"):
        load_rgb(str(path))


@pytest.mark.parametrize("mode, suffix", [("1", "png"), ("L", "png"), ("P", "png"), ("LA", "png"),
                                          ("RGBA", "png"), ("CMYK", "jpg"), ("RGB", "jpg")])
def test_8bit_modes_read_as_plain_convert(tmp_path, mode, suffix):
    pixels = np.random.default_rng(1).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    source = Image.fromarray(pixels, "RGBA") if "A" in mode else Image.fromarray(pixels[..., :3])
    image = source.convert(mode)
    path = tmp_path / f"x.{suffix}"
    image.save(path)
    with Image.open(path) as reference:
        assert reference.mode == mode
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(str(path))), expected)


# -- the val check -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_check_names_a_truncated_image(tmp_path, num_workers):
    write_classes(tmp_path, "train", ["a", "b"], per_class=3)
    write_classes(tmp_path, "val", ["a", "b"], per_class=40)
    bad = tmp_path / "val" / "b" / "17.png"
    truncate(bad)
    _, val = train_val_folders(str(tmp_path))
    problem = f"val image check: cannot read image {re.escape(str(bad))} .*Remove or replace that file"
    with pytest.raises(UserError, match=problem):
        check_images(val, "val", num_workers=num_workers, batch_size=8)
    check_images(val, "val", indices=[i for i, (path, _) in enumerate(val.samples) if path != str(bad)],
                 num_workers=num_workers)


def test_val_check_counts_several_bad_images(tmp_path):
    write_classes(tmp_path, "train", ["a"], per_class=2)
    write_classes(tmp_path, "val", ["a"], per_class=10)
    for i in (2, 5, 7):
        truncate(tmp_path / "val" / "a" / f"{i}.png")
    Image.new("F", (8, 8)).save(tmp_path / "val" / "a" / "float.tif")
    _, val = train_val_folders(str(tmp_path))
    with pytest.raises(UserError, match=r"4 of 11 images cannot be read, first: cannot read image .*2\.png.*; "
                                        r"also .*5\.png, .*7\.png, .*float\.tif\. Remove or replace"):
        check_images(val, "val", num_workers=0)


def test_corrupt_val_image_stops_the_run_before_the_first_epoch(digits, tmp_path, capsys):
    from ToE.deit.main import cli

    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    bad = sorted((data / "val" / "3").glob("*.png"))[0]
    truncate(bad)
    with pytest.raises(SystemExit) as exit_info:
        cli(["--data-path", str(data), *TINY, *FAST, "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: val image check: ") and str(bad) in lines[0], captured.err
    assert "epoch 0" not in captured.out
