"""--data-backend dali: the DALI input pipeline (CPU backend here; the GPU's in run/gpu_check.sh)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import FAST, INPUT, MAIN, NUM_VAL, SCHEDULE, TINY, load, ok, run_main
from PIL import Image

from timm.utils import random_seed as seed_everything

from ToE.common.errors import UserError

pytest.importorskip("nvidia.dali")

from ToE.common import dali  # noqa: E402
from ToE.common.data import train_val_folders  # noqa: E402
from ToE.common.data import build_eval_transform  # noqa: E402


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
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[train.samples[i][1] for i in order[:4]],
                                                [train.samples[i][1] for i in order[4:]]]
    assert batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.float32
    # every draw (erasing included) comes from the seed, none from Python's or torch's global generators
    torch.manual_seed(123)
    again = [b[0] for b in dali.train_loader(train.samples, order, 4, 16, args, args.aa, torch.device("cpu"), seed=1)]
    other = [b[0] for b in dali.train_loader(train.samples, order, 4, 16, args, args.aa, torch.device("cpu"), seed=2)]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, batches))  # a seed fixes the augmentation
    assert not torch.equal(other[0], batches[0][0])


def _args(*flags):
    return pytest.importorskip("ToE.deit.main").parse_args(["--num_workers", "1", *flags])


def test_one_pipeline_serves_every_epoch_and_resumes_mid_epoch_exactly(data):
    """A TrainLoader builds its pipeline once; each epoch's augmentation depends on its seed and the batch's
    position only: the same after other epochs, after an epoch left half-read, and for the batches a
    mid-epoch resume still trains (``first_batch``)."""
    train, _ = train_val_folders(str(data))
    args = _args("--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25")
    order = list(np.random.default_rng(0).permutation(len(train.samples)))
    built = dali.BUILDS["train"]
    loader = dali.TrainLoader(train.samples, 16, args, torch.device("cpu"))
    epochs = [loader.epoch(order, 4, args.aa, seed=seed) for seed in (10, 11, 10)]
    first, second, third = ([b[0] for b in epoch] for epoch in epochs)
    assert len(first) == len(epochs[0]) == len(order) // 4
    assert all(epoch.pipeline is epochs[0].pipeline for epoch in epochs) and dali.BUILDS["train"] == built + 1
    assert all(torch.equal(a, b) for a, b in zip(first, third)) and not torch.equal(first[0], second[0])
    unfinished = iter(loader.epoch(order, 4, args.aa, seed=11))
    next(unfinished)  # a consumer that stops after one batch (a preempted epoch)
    resumed = [b[0] for b in loader.epoch(order[8:], 4, args.aa, seed=10, first_batch=2)]
    assert len(resumed) == len(first) - 2 and all(torch.equal(a, b) for a, b in zip(first[2:], resumed))
    assert dali.BUILDS["train"] == built + 1
    # a curriculum's new magnitude is an input of the same pipeline; a larger batch builds one more
    assert not torch.equal(next(iter(loader.epoch(order, 4, "rand-m3-inc1", seed=10)))[0], first[0])
    assert dali.BUILDS["train"] == built + 1
    assert next(iter(loader.epoch(order, 6, args.aa, seed=10)))[0].shape[0] == 6
    assert dali.BUILDS["train"] == built + 2


def test_a_run_builds_its_dali_pipelines_once(data):
    """The trainer asks its one TrainLoader for every epoch: one training pipeline per run, and the
    evaluation pipeline is kept between evaluations."""
    from ToE.common.lifecycle import Run
    from ToE.deit.main import parse_args
    from ToE.deit.trainer import DeiTTask

    args = parse_args(["--data-path", str(data), *TINY, *FAST, "--data-backend", "dali", "--aa",
                       "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--epochs", "3", "--no-repeated-aug"])
    task = Run(args, DeiTTask).task
    built = dict(dali.BUILDS)
    loaders = [task.train_loader(epoch, task.plan[epoch], 0) for epoch in range(3)]
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader) == 24 // 4 and batches[0][0].shape == (4, 3, INPUT, INPUT)
    assert all(loader.pipeline is loaders[0].pipeline for loader in loaders)
    for _ in range(2):
        assert sum(len(t) for _, t in task.val_loader) == NUM_VAL
    assert dali.BUILDS["train"] == built.get("train", 0) + 1 and dali.BUILDS["eval"] == built.get("eval", 0) + 1


def test_training_crop_is_the_drawn_window_resampled_as_pil_does(tmp_path):
    """The training graph decodes the window the host drew (``crop_windows``, rows top, left, height,
    width) and resizes it: against PIL's bicubic resize of that window (timm's torch path), on smooth
    images of several shapes (PNG: both decoders give the same pixels). Measured: 0.17 grey levels apart on
    average, at most 2."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(0)
    samples = []
    for k, (height, width) in enumerate([(48, 64), (64, 40), (40, 40), (30, 90)] * 2):
        small = rng.integers(0, 256, (height // 6, width // 6, 3), dtype=np.uint8)
        path = tmp_path / f"{k}.png"
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path)
        samples.append((str(path), k % 3))
    args = _args("--aa", "none", "--reprob", "0", "--hflip", "0", "--color-jitter", "0", "--scale", "0.2", "1.0")
    loader = dali.TrainLoader(samples, 24, args, torch.device("cpu"))
    out = torch.cat([b[0] for b in loader.epoch(range(8), 4, "none", seed=5)])
    mean = torch.tensor(dali.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(dali.IMAGENET_DEFAULT_STD)[:, None, None]
    expected = []
    for position in range(2):
        batch = samples[4 * position:4 * position + 4]
        sizes = np.array([dali.stored_size(open(path, "rb").read()) for path, _ in batch])
        windows = dali.crop_windows(np.random.default_rng([5, position]), sizes, args.scale)
        for (path, _), (top, left, height, width) in zip(batch, windows):
            crop = F.resized_crop(Image.open(path).convert("RGB"), int(top), int(left), int(height), int(width),
                                  [24, 24], F.InterpolationMode.BICUBIC)
            expected.append((F.to_tensor(crop) - mean) / std)
    difference = (out - torch.stack(expected)).abs() * 255 * std  # grey levels
    assert difference.mean() < 0.5 and difference.max() <= 6, (difference.mean(), difference.max())


def _window_features(windows, height, width):
    top, left, h, w = windows.T.astype(float)
    return {"area": h * w / (height * width), "aspect": np.log(w / h), "top": top / np.maximum(height - h, 1),
            "left": left / np.maximum(width - w, 1)}


def test_crop_windows_follow_timms_random_resized_crop():
    """The host's windows against timm's ``get_params`` (seeded), per image shape: quantiles of the area
    share, the log aspect and the placement, including a shape so wide that timm falls back to a centred
    crop."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    crop = RandomResizedCropAndInterpolation(224, scale=(0.08, 1.0))
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    seed_everything(0)
    for height, width in [(375, 500), (500, 375), (64, 64), (30, 200)]:
        sizes = np.array([[height, width]] * 2000)
        ours = dali.crop_windows(np.random.default_rng(height), sizes, crop.scale, crop.ratio)
        assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
        assert (ours[:, 1] + ours[:, 3] <= width).all() and (ours[:, 2:] > 0).all()
        image = Image.new("RGB", (width, height))
        timms = np.array([crop.get_params(image, crop.scale, crop.ratio) for _ in range(len(sizes))])

        mine, theirs = _window_features(ours, height, width), _window_features(timms, height, width)
        for name in ("area", "aspect"):
            a, b = np.quantile(mine[name], quantiles), np.quantile(theirs[name], quantiles)
            assert np.allclose(a, b, atol=0.05), (height, width, name, a, b)
        for name in ("top", "left"):  # uniform over the free range (a few pixels when the window is large)
            assert abs(mine[name].mean() - theirs[name].mean()) < 0.03, (height, width, name)


def test_stored_size_reads_jpeg_and_png_headers_as_pil(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": decoded as stored, as PIL does
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "b.jpg", quality=90, progressive=True, exif=exif.tobytes())
    Image.fromarray(pixels).save(tmp_path / "c.png")
    Image.fromarray(pixels).save(tmp_path / "d.bmp")
    for name in ("a.jpg", "b.jpg", "c.png", "d.bmp"):
        assert dali.stored_size((tmp_path / name).read_bytes()) == (37, 53), name


@pytest.mark.parametrize("mode, max_count", [("const", 1), ("const", 3), ("pixel", 1), ("rand", 2)])
def test_random_erasing_on_the_batch_follows_timms_per_image_erasing(mode, max_count):
    """``BatchErasing`` erases each image of a batch with the given probability, on every channel alike,
    with timm's distribution of erased area, and fills as timm's mode says; images it does not erase
    are left as they were."""
    from timm.data.random_erasing import RandomErasing

    count, size, probability = 3000, 20, 0.25
    erase = dali.BatchErasing(probability, mode=mode, max_count=max_count)
    images = torch.full((count, 3, size, size), 7.0)
    erase.apply(images, erase.draw(np.random.default_rng(0), count, size, size))
    touched = images != 7.0
    assert torch.equal(touched[:, 0], touched[:, 1]) and torch.equal(touched[:, 0], touched[:, 2])
    erased = touched.flatten(1).any(1)
    share = erased.double().mean().item()
    assert abs(share - probability) < 4 * (probability * (1 - probability) / count) ** 0.5, share
    seed_everything(0)
    reference = torch.full((count, 3, size, size), 7.0)
    RandomErasing(probability, mode=mode, max_count=max_count, device="cpu")(reference)
    area = touched[:, 0].flatten(1).double().mean(1)[erased].numpy()
    timm_touched = reference[:, 0] != 7.0
    timm_area = timm_touched.flatten(1).double().mean(1)[timm_touched.flatten(1).any(1)].numpy()
    assert np.allclose(np.quantile(area, [0.25, 0.5, 0.75]), np.quantile(timm_area, [0.25, 0.5, 0.75]),
                       atol=0.03), (np.quantile(area, [0.25, 0.5, 0.75]), np.quantile(timm_area, [0.25, 0.5, 0.75]))
    values = images[touched]
    if mode == "const":
        assert (values == 0).all()
    elif mode == "pixel":
        assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 1) < 0.02
    else:  # one colour per channel and rectangle
        assert len(values.unique()) <= count * max_count * 3


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
