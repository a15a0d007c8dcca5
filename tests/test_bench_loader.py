"""Tests of bench.loader: the photo folder, the cores-per-GPU arithmetic, the summary of rounds and
a --quick run end to end."""

import hashlib
import json

import pytest
from PIL import Image

from bench import loader


def test_cores_needed_is_gpu_rate_times_speedup_over_per_core_rate():
    assert loader.cores_needed(1000.0, 2.0, 250.0) == pytest.approx(8.0)
    assert loader.cores_needed(3500.0, 1.0, 350.0) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        loader.cores_needed(1000.0, 1.0, 0.0)


def test_stage_speedups_of_the_published_deit_small_schedule():
    speed = loader.stage_speedups()
    assert speed["model"] == "deit_small_patch16_224"
    assert [s["kept_patches"] for s in speed["stages"]] == [98, 147, 196]
    assert [s["epochs"] for s in speed["stages"]] == [100, 100, 100]
    s1, s2, s3 = (s["speedup"] for s in speed["stages"])
    assert s3 == pytest.approx(1.0)
    assert 1.8 < s1 < 2.0 and 1.25 < s2 < 1.4  # bench.speed's FLOP-ideal column: 1.880x, 1.313x
    # equal thirds: the harmonic mean of the stage speedups
    assert speed["run_speedup"] == pytest.approx(3 / (1 / s1 + 1 / s2 + 1 / s3))


def _results(rates):
    """A loader.json as main writes it, before summarise, from {config: [images/s per round]} (2 s each)."""
    configs = loader.configurations(["torch", "dali"], [1])
    rounds = []
    for index in range(len(next(iter(rates.values())))):
        rounds.append({"measurements": [{"config": name, "images": int(rate[index] * 2), "wall_s": 2.0,
                                         "cpu_s": 2.0 * 1.25} for name, rate in rates.items()]})
    return {"configs": configs, "rounds": rounds, "gpu_assumptions": [{"gpu": "G", "images_per_s": 1000.0,
                                                                       "source": "test"}],
            "stage_speedups": {"model": "m", "recipe": "r", "num_patches": 196, "run_speedup": 1.5,
                               "stages": [{"stage": 1, "keep_rate": 0.5, "kept_patches": 98, "epochs": 1,
                                           "speedup": 2.0}]}}


def test_summarise_rates_aa_control_and_cores_table():
    configs = loader.configurations(["torch", "dali"], [1, 2])
    assert [c["name"] for c in configs] == ["torch/1", "torch/1#2", "dali/1", "dali/1#2", "torch/2", "dali/2"]
    results = loader.summarise(_results({"torch/1": [100, 120, 110], "torch/1#2": [100, 100, 110],
                                         "dali/1": [200, 200, 200], "dali/1#2": [200, 250, 200]}))
    torch1 = next(c for c in results["configs"] if c["name"] == "torch/1")
    assert torch1["images_per_s"] == {"median": 110, "min": 100, "max": 120}
    assert torch1["images_per_cpu_s"]["median"] == pytest.approx(110 / 1.25)
    aa = {tuple(a["configs"]): a for a in results["aa_controls"]}
    assert aa[("torch/1", "torch/1#2")]["ratios"] == pytest.approx([1.0, 100 / 120, 1.0])  # second / first
    assert aa[("dali/1", "dali/1#2")]["max_deviation"] == pytest.approx(0.25)
    assert results["dali_vs_torch"]["ratios"] == pytest.approx([2.0, 200 / 120, 200 / 110])
    assert results["dali_vs_torch"]["cpu_ratios"] == pytest.approx([2.0, 200 / 120, 200 / 110])
    # per-core rate: images per CPU-second over both measurements of the backend at one worker
    assert results["per_core"]["torch"]["images_per_cpu_s"] == pytest.approx(105 / 1.25)
    assert results["per_core"]["dali"]["images_per_cpu_s"] == pytest.approx(200 / 1.25)
    stage1 = next(r for r in results["cores_per_gpu"] if r["stage"] == 1)
    assert stage1["torch"] == pytest.approx(1000 * 2.0 / (105 / 1.25))
    assert stage1["dali"] == pytest.approx(1000 * 2.0 / (200 / 1.25))
    run = next(r for r in results["cores_per_gpu"] if r["stage"] == "run")
    assert run["gpu_images_per_s"] == pytest.approx(1500)


def _digests(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_photo_folder_distinct_imagenet_sized_and_reproducible(tmp_path):
    paths = loader.build_photo_folder(str(tmp_path / "a"), count=16, classes=3, seed=5, log=lambda *_: None)
    assert len(paths) == 16 and len({p.split("/")[-2] for p in paths}) == 3
    assert len(set(_digests(paths))) == 16  # every file distinct
    sizes = set()
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert sizes <= {(500, 375), (375, 500)} and (500, 375) in sizes
    again = loader.build_photo_folder(str(tmp_path / "b"), count=16, classes=3, seed=5, log=lambda *_: None)
    assert _digests(again) == _digests(paths)  # same seed, same bytes
    other = loader.build_photo_folder(str(tmp_path / "c"), count=16, classes=3, seed=6, log=lambda *_: None)
    assert not set(_digests(other)) & set(_digests(paths))
    # reused while its manifest matches: nothing rewritten
    written = []
    loader.build_photo_folder(str(tmp_path / "a"), count=16, classes=3, seed=5, log=written.append)
    assert written == []


def test_photo_folder_refuses_a_foreign_train_folder(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "train" / "cats" / "x.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        loader.build_photo_folder(str(tmp_path), count=2, classes=1, log=lambda *_: None)


@pytest.mark.e2e
def test_quick_run_measures_both_backends(tmp_path):
    try:
        import nvidia.dali  # noqa: F401
        backends = ["torch", "dali"]
    except ImportError:
        backends = ["torch"]
    loader.main(["--quick", "--out", str(tmp_path), "--backends", *backends])
    stored = json.loads((tmp_path / "loader.json").read_text())
    for backend in backends:
        assert stored["per_core"][backend]["images_per_s_per_worker"] > 0
        assert stored["per_core"][backend]["images_per_cpu_s"] > 0
    assert stored["load"]["before"] is not None and stored["machine"]["cpu_count"] > 0
    assert all(row[b] > 0 for row in stored["cores_per_gpu"] for b in backends)
    text = (tmp_path / "loader.md").read_text()
    loader.main(["--render", "--out", str(tmp_path)])
    assert (tmp_path / "loader.md").read_text() == text
