"""--data-backend dali: the DALI input pipeline (CPU backend here; the GPU's in run/gpu_check.sh)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import FAST, MAIN, SCHEDULE, TINY, load, ok, run_main
from PIL import Image

from timm.utils import random_seed as seed_everything

from ToE.common.errors import UserError

pytest.importorskip("nvidia.dali")

from ToE.common import dali  # noqa: E402
from ToE.common.data import train_val_folders  # noqa: E402
from ToE.common.transforms import build_eval_transform  # noqa: E402


@pytest.mark.parametrize("policy, expected", [
    ("rand-m9-mstd0.5-inc1", {"n": 2, "m": 9, "num_magnitude_bins": 11, "monotonic_mag": True}),
    ("rand-m7-n3", {"n": 3, "m": 7, "num_magnitude_bins": 11, "monotonic_mag": False}),
    ("rand-m10", {"n": 2, "m": 10, "num_magnitude_bins": 11, "monotonic_mag": False}),
    ("none", None),
])
def test_timm_policy_maps_onto_dali_rand_augment(policy, expected):
    assert dali.rand_augment_args(policy) == expected


@pytest.mark.parametrize("policy", ["augmix-m5", "original", "rand-m9.5", "rand-m12"])
def test_policies_dali_cannot_run_are_refused(policy):
    with pytest.raises(UserError, match="DALI backend"):
        dali.rand_augment_args(policy)


def test_eval_batches_equal_the_torch_path_in_order_and_nearly_in_pixels(data):
    """Same images, same order, same class indices as the torch path; resize kernels differ a little."""
    _, val = train_val_folders(str(data), None, build_eval_transform(16, interpolation="bicubic", crop_pct=0.875))
    loader = dali.eval_loader(val.samples, range(len(val)), 3, 16, 0.875, torch.device("cpu"), 1)
    assert len(loader) == 3  # 7 images: 3 + 3 + 1, the last batch kept
    images, targets = zip(*loader)
    images, targets = torch.cat(images), torch.cat(targets)
    assert targets.tolist() == [label for _, label in val.samples]
    expected = torch.stack([val[i][0] for i in range(len(val))])
    assert images.shape == expected.shape == (7, 3, 16, 16)
    assert (images - expected).abs().mean() < 0.15, (images - expected).abs().mean()


@pytest.mark.parametrize("brightness, contrast, saturation", [(1.3, 0.7, 1.0), (0.7, 1.3, 0.7), (1.0, 1.0, 1.3)])
def test_color_jitter_is_torchvisions(brightness, contrast, saturation):
    """The colour jitter timm uses without RandAugment, with fixed factors, against torchvision's
    brightness, contrast (about the image's mean grey) and saturation on a dark, coloured image."""
    from nvidia.dali import fn, pipeline_def, types
    from torchvision.transforms import functional as F

    image = np.random.default_rng(0).integers(0, 120, (12, 10, 3), dtype=np.uint8)
    image[..., 0] //= 2  # coloured, so that saturation matters

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        source = fn.external_source(source=[[image]], layout="HWC", dtype=types.UINT8, cycle=True)
        return dali._color_jitter(source, brightness, contrast, saturation)

    built = pipe()
    built.build()
    out = torch.from_numpy(np.array(built.run()[0].as_tensor())[0]).permute(2, 0, 1).float()
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, brightness), contrast), saturation) * 255
    assert (out - expected).abs().max() <= 1.0, (out - expected).abs().max()


def test_random_resized_crop_windows_follow_timms_distribution():
    """DALI's crop windows (read back from an image whose pixels hold their coordinates) against
    timm's ``get_params``: area and aspect quantiles of 2,000 draws each, seeded."""
    from nvidia.dali import fn, pipeline_def, types
    from timm.data.transforms import RandomResizedCropAndInterpolation

    size, batch = 64, 500
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([xs * 4, ys * 4, np.zeros_like(xs)], -1).astype(np.uint8)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=3)
    def pipe():
        source = fn.external_source(source=[[image] * batch], layout="HWC", dtype=types.UINT8, cycle=True)
        return fn.random_resized_crop(source, size=[size, size], random_area=[0.6, 1.0],
                                      random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], interp_type=types.INTERP_LINEAR)

    built = pipe()
    built.build()
    out = np.concatenate([np.array(built.run()[0].as_tensor()) for _ in range(4)]).astype(float)
    width = (out[:, :, -1, 0].mean(1) - out[:, :, 0, 0].mean(1)) / 4 * size / (size - 1)
    height = (out[:, -1, :, 1].mean(1) - out[:, 0, :, 1].mean(1)) / 4 * size / (size - 1)
    crop = RandomResizedCropAndInterpolation(size, scale=(0.6, 1.0))
    seed_everything(0)  # timm draws the windows from Python's generator
    windows = np.array([crop.get_params(Image.fromarray(image), crop.scale, crop.ratio)[2:] for _ in range(len(out))])
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    area = np.quantile(width * height / size ** 2, quantiles), np.quantile(windows.prod(1) / size ** 2, quantiles)
    aspect = (np.quantile(np.log(width / height), quantiles),
              np.quantile(np.log(windows[:, 1] / windows[:, 0]), quantiles))
    assert np.allclose(*area, atol=0.02) and np.allclose(*aspect, atol=0.02), (area, aspect)


def test_random_resized_crop_resamples_its_window_as_pil_does():
    """The pixels of DALI's bicubic random-resized crop against PIL's bicubic resize of the same
    window (timm's torch path): two pipelines with one seed draw the same windows, one over smooth
    8 x 8 noise upscaled to 32 px (as the digits), one over an image holding its coordinates, from
    which each window is read back. Measured: 0.23 grey levels apart on average, at most 5; DALI's
    bilinear crop would be 1.1 apart."""
    from nvidia.dali import fn, pipeline_def, types
    from torchvision.transforms import functional as F

    size, batch = 32, 64
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((size, size),
                                                                                                Image.BILINEAR)
                         .convert("RGB")) for _ in range(batch)]
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coordinates = np.stack([xs * 6 + 30, ys * 6 + 30, np.zeros_like(xs)], -1).astype(np.uint8)

    def crops(batch_images):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=7)
        def pipe():
            source = fn.external_source(source=[batch_images], layout="HWC", dtype=types.UINT8, cycle=True)
            return fn.random_resized_crop(source, size=[size, size], random_area=[0.6, 1.0],
                                          random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], interp_type=types.INTERP_CUBIC)

        built = pipe()
        built.build()
        return np.array(built.run()[0].as_tensor()).astype(float)

    out, where = crops(images), crops([coordinates] * batch)
    centres = np.arange(size) + 0.5
    inner = slice(4, size - 4)  # the cubic kernel reproduces a linear ramp away from the borders
    expected = []
    for k in range(batch):
        x_scale, x_start = np.polyfit(centres[inner], (where[k, size // 2, inner, 0] - 30) / 6 + 0.5, 1)
        y_scale, y_start = np.polyfit(centres[inner], (where[k, inner, size // 2, 1] - 30) / 6 + 0.5, 1)
        top, left, height, width = (int(round(v)) for v in (y_start, x_start, y_scale * size, x_scale * size))
        expected.append(np.asarray(F.resized_crop(Image.fromarray(images[k]), top, left, height, width, [size, size],
                                                  F.InterpolationMode.BICUBIC)))
    difference = np.abs(out - np.stack(expected))
    assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())


def test_train_batches_follow_the_sampler_order_with_the_recipes_augmentation(data):
    train, _ = train_val_folders(str(data))
    args = pytest.importorskip("ToE.deit.main").parse_args(["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"])
    order = [5, 0, 17, 3, 9, 22, 1, 8]
    loader = dali.train_loader(train.samples, order, 4, 16, args, args.aa, torch.device("cpu"), seed=1)
    seed_everything(0)  # random erasing draws from Python's and torch's generators (the run restores both)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[train.samples[i][1] for i in order[:4]],
                                                [train.samples[i][1] for i in order[4:]]]
    assert batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.float32
    seed_everything(0)
    again = [b[0] for b in dali.train_loader(train.samples, order, 4, 16, args, args.aa, torch.device("cpu"), seed=1)]
    seed_everything(0)
    other = [b[0] for b in dali.train_loader(train.samples, order, 4, 16, args, args.aa, torch.device("cpu"), seed=2)]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, batches))  # a seed fixes the augmentation
    assert not torch.equal(other[0], batches[0][0])


def test_unreadable_file_is_named(tmp_path, data):
    train, _ = train_val_folders(str(data))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    samples = list(train.samples[:3]) + [(str(bad), 0)]
    args = pytest.importorskip("ToE.deit.main").parse_args(["--aa", "none"])
    with pytest.raises(UserError, match="broken.png"):
        list(dali.train_loader(samples, range(4), 4, 16, args, "none", torch.device("cpu"), seed=0))


def test_lvvit_refuses_dali_in_one_line(data, capsys):
    from ToE.lvvit.main import cli

    with pytest.raises(SystemExit):
        cli(["--data-path", str(data), "--data-backend", "dali", "--check-only", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert "LV-ViT keeps the torch input path" in err and len(err.splitlines()) == 1


@pytest.mark.e2e
def test_deit_with_dali_resumes_at_epoch_boundaries_exactly(data, tmp_path):
    """2 + 2 epochs equal 4 with --data-backend dali (RandAugment, erasing, mixup: the full recipe)."""
    flags = ["--data-path", data, *TINY, *FAST, *SCHEDULE, "--data-backend", "dali", "--aa", "rand-m9-mstd0.5-inc1",
             "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--no-repeated-aug", "--model-ema-decay", "0.9"]
    ok(run_main(*flags, "--epochs", 4, "--output_dir", tmp_path / "straight"))
    ok(run_main(*flags, "--epochs", 4, "--stop-after-epochs", 2, "--output_dir", tmp_path / "split"))
    ok(run_main(*flags, "--epochs", 4, "--auto-resume", "--output_dir", tmp_path / "split"))
    a, b = load(tmp_path / "straight" / "checkpoint.pth"), load(tmp_path / "split" / "checkpoint.pth")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.e2e
def test_efficienttrain_with_dali_follows_the_curriculum(tmp_path):
    """The plan's magnitude reaches DALI's RandAugment, its low-pass view the batch, across a resolution change."""
    from helpers import write_images

    images = write_images(tmp_path / "images32")
    for path in (images / "train").rglob("*.png"):  # 32 px images for 24 -> 32 px segments
        Image.fromarray(np.asarray(Image.open(path).resize((32, 32)))).save(path)
    result = ok(run_main(
        "--data-path", images, "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2",
        "num_heads=2", "--input-size", "32", "--patch-size", "4", "--device", "cpu", "--num_workers", "0",
        "--batch-size", "4", "--global-batch", "8", "--no-pin-mem", "--epochs", "5", "--warmup-epochs", "1",
        "--unscale-lr", "--no-repeated-aug", "--aa", "rand-m9-mstd0.5-inc1", "--data-backend", "dali",
        "--expansion-step", "0", "2", "4", "--keep-rate", "0.6", "0.8", "1.0", "--output_dir", tmp_path / "et",
        cmd=[sys.executable, str(MAIN.parents[1] / "EfficientTrain" / "main.py")]))
    assert "24 px" in result.stdout and "32 px" in result.stdout and "rand-m1-" in result.stdout


def test_missing_dali_is_one_line(data, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali") or name == "nvidia":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda120"):
        dali.require_dali()


def test_unknown_backend_is_refused(data, capsys):
    from ToE.deit.main import cli

    with pytest.raises(SystemExit):
        cli(["--data-path", str(data), "--data-backend", "pil", "--check-only"])
    assert "--data-backend" in capsys.readouterr().err
