"""Tests of the Fashion-MNIST folder builder (ToE/common/fashion.py).

Most run on a small synthetic set of IDX files written here (so they need no package); one reads a
sample of the real Debian package's files and is skipped, saying why, where it is not installed.
The IDX files are parsed here with ``struct``, independently of the builder's reader.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ToE.common import fashion
from ToE.common.errors import UserError

FOLDERS = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
           "8_bag", "9_ankle_boot"]
SMALL = {"train": 13, "val": 7}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0, 0, 0x08, ndim, then the dimensions as big-endian uint32."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def parse_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def write_idx_set(folder, seed=0, gz_train=True):
    """Four small IDX files (train gzipped, val not, as both occur); returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, count in SMALL.items():
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) * 3 % 10).astype(np.uint8)  # every class at least once in train
        gz = gz_train and split == "train"
        for name, array in zip(fashion.FILES[split], (images, labels)):
            path = os.path.join(folder, name + (".gz" if gz else ""))
            with (gzip.open(path, "wb") if gz else open(path, "wb")) as handle:
                handle.write(idx_bytes(array))
        written[split] = (images, labels)
    return written


def images_under(out, split):
    """{index: (class folder, pixels)} of every PNG written for ``split``."""
    found = {}
    for folder in sorted(os.listdir(os.path.join(out, split))):
        for name in os.listdir(os.path.join(out, split, folder)):
            with Image.open(os.path.join(out, split, folder, name)) as image:
                found[int(name.split(".")[0])] = (folder, np.asarray(image))
    return found


@pytest.fixture
def source(tmp_path):
    return str(tmp_path / "idx"), write_idx_set(str(tmp_path / "idx"))


def test_written_images_are_the_idx_pixels_under_their_labels(source, tmp_path):
    folder, written = source
    out = str(tmp_path / "fashion")
    _, counts = fashion.build_fashion(out, source=folder, limit=100)
    assert counts == SMALL
    for split in ("train", "val"):
        assert sorted(os.listdir(os.path.join(out, split))) == FOLDERS  # sorted = label order
        found = images_under(out, split)
        images, labels = written[split]
        assert sorted(found) == list(range(len(images)))
        for index, (class_folder, pixels) in found.items():
            assert class_folder == FOLDERS[labels[index]]
            assert pixels.dtype == np.uint8 and np.array_equal(pixels, images[index])


def test_a_build_is_idempotent_resizes_and_refuses_a_foreign_folder(source, tmp_path):
    folder, written = source
    out = str(tmp_path / "fashion")
    fashion.build_fashion(out, source=folder, limit=100)
    sample = os.path.join(out, "val", FOLDERS[written["val"][1][0]], "00000.png")
    before = os.stat(sample).st_mtime_ns
    fashion.build_fashion(out, source=folder, limit=100)  # complete: left alone
    assert os.stat(sample).st_mtime_ns == before
    fashion.build_fashion(out, size=32, source=folder, limit=100)  # an older build of ours: replaced
    with Image.open(sample) as image:
        assert image.size == (32, 32)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".fashion-")]  # no staging left
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match="did not write"):
        fashion.build_fashion(str(foreign), source=folder, limit=100)
    assert (foreign / "holiday.jpg").read_bytes() == b"mine"


def test_torchvision_raw_layout_and_uncompressed_files(tmp_path):
    raw = tmp_path / "torchvision" / "FashionMNIST" / "raw"
    written = write_idx_set(str(raw), seed=1, gz_train=False)
    out = str(tmp_path / "fashion")
    fashion.build_fashion(out, source=str(tmp_path / "torchvision"), limit=100)
    found = images_under(out, "train")
    assert np.array_equal(found[4][1], written["train"][0][4])


def test_damaged_or_foreign_idx_files_are_one_line_errors(source, tmp_path):
    folder, _ = source
    path = os.path.join(folder, "t10k-images-idx3-ubyte")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])
    with pytest.raises(UserError, match="truncated"):
        fashion.build_fashion(str(tmp_path / "a"), source=folder, limit=100)
    open(path, "wb").write(b"PK\x03\x04" + data[4:])
    with pytest.raises(UserError, match="not an IDX file"):
        fashion.build_fashion(str(tmp_path / "b"), source=folder, limit=100)
    with pytest.raises(UserError, match="not Fashion-MNIST's 60000"):  # without the test-only limit
        fashion.build_fashion(str(tmp_path / "c"), source=folder)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_no_source_is_one_line_naming_the_package_and_source(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(fashion, "PACKAGE_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(fashion, "PACKAGE", "no-such-package-toe-test")
    from ToE.common.errors import run_main

    with pytest.raises(SystemExit) as stop:
        run_main(lambda: fashion.main(["--out", str(tmp_path / "out")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "apt-get install dataset-fashion-mnist" in err[0] and "--source" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_command_line_has_no_traceback_for_a_missing_source(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ToE.common.fashion", "--out", str(tmp_path / "out"), "--source",
                             str(tmp_path / "none")], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "apt-get install dataset-fashion-mnist" in result.stderr


def test_a_sample_of_the_debian_package(tmp_path):
    folder = fashion.package_folder()
    if folder is None:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed (apt-get install "
                    "dataset-fashion-mnist); the synthetic-IDX tests cover the builder")
    expected = {"train": 60000, "val": 10000}
    truth = {}
    for split, (images_name, labels_name) in fashion.FILES.items():
        images = parse_idx(fashion._find_file(folder, images_name))
        labels = parse_idx(fashion._find_file(folder, labels_name))
        assert images.shape == (expected[split], 28, 28) and labels.shape == (expected[split],)
        assert np.bincount(labels, minlength=10).tolist() == [expected[split] // 10] * 10  # balanced classes
        truth[split] = images, labels
    out = str(tmp_path / "fashion")
    _, counts = fashion.build_fashion(out, limit=50)  # the package's files, the first 50 of each split
    assert counts == {"train": 50, "val": 50}
    for split in ("train", "val"):
        images, labels = truth[split]
        for index, (class_folder, pixels) in images_under(out, split).items():
            assert class_folder == FOLDERS[labels[index]] and np.array_equal(pixels, images[index])


# -- the benchmark's arithmetic (bench/fashion.py; nothing trained) ----------------------------

def test_bench_rows_pair_by_seed_and_predict_flops(tmp_path):
    from bench import fashion as bench

    runs = []
    # ToE's epochs at 0.6 / 0.8 / 1.0 of full tokens' per stage; the machine ran 25 % slower while full tokens
    # trained with seed 2 (drift between runs): the wall-time ratio carries it, the stage-normalised one not
    for seed, (full, toe) in enumerate([(90.0, 90.5), (91.0, 91.1), (89.0, 89.6)]):
        full_epochs, toe_epochs = [25.0 if seed == 2 else 20.0] * 6, [12.0, 12.0, 16.0, 16.0, 20.0, 20.0]
        runs.append({"config": "full", "seed": seed, "epochs": 6, "acc1": full, "epoch_seconds": full_epochs,
                     "time_s": sum(full_epochs)})
        runs.append({"config": "toe", "seed": seed, "epochs": 6, "acc1": toe, "epoch_seconds": toe_epochs,
                     "time_s": sum(toe_epochs)})
    rows = bench.summarise(runs, list(bench.METHODS), epochs=6)
    assert [row["method"] for row in rows] == ["full", "toe"]
    toe = rows[1]
    assert toe["seeds"] == [0, 1, 2] and toe["diff_vs_full"] == pytest.approx(0.4)
    assert toe["diff_se"] == pytest.approx(np.std([0.5, 0.1, 0.6], ddof=1) / np.sqrt(3))
    assert toe["time_ratio"] == pytest.approx(0.8) and toe["time_ratio_se"] == pytest.approx(0.0, abs=1e-12)
    assert toe["wall_time_ratio"] == pytest.approx((0.8 + 0.8 + 96 / 150) / 3) and rows[0]["flop_ratio"] == 1.0
    # a run marked untimed keeps its top-1 and leaves the time columns
    runs[5]["untimed"] = "beside the test suite"
    assert bench.summarise(runs, ["toe"], epochs=6)[0]["time_ratio_per_seed"] == pytest.approx([0.8, 0.8])
    # every after-block-0 reducer has ToE's FLOPs; PatchDropout at the input shortens block 0 too
    ratios = {name: bench.flop_ratio(name, 6) for name in bench.HEADLINE}
    assert ratios["toe"] == ratios["random"] == ratios["topk"] == ratios["tome"] < 1.0
    assert ratios["patchdrop"] < ratios["toe"]
    assert ratios["patchdrop-flops"] == pytest.approx(ratios["toe"], rel=2e-3)
    assert bench.method_flags("tome", 6)[:4] == ["--expansion-step", "0", "2", "4"]
    results = {"command": "c", "machine": {"cpu_model": "x", "cpu_count": 2, "torch": "t"}, "epochs": 6,
               "train_subset": 15000, "parallel": 2, "threads": 1, "summary": rows,
               "runs": [{**run, "load_before": [1.0], "load_after": [1.5]} for run in runs]}
    table = bench.write_outputs(results, str(tmp_path), figure=None)
    row = ("| ToE (after block 0) | 3 | 90.40 ± 0.44 | +0.40 ± 0.15 | reference | 96 ± 0 | 0.747 ± 0.053 | "
           "0.800 ± 0.000 | 1.25x |")
    assert row in table and "the paper says" not in table  # the claims column is the ablation table's
    # the ablation table sets each row beside what the paper claims of it
    for seed, acc in enumerate([89.0, 90.0, 88.5]):
        runs.append({"config": "merge-drop", "seed": seed, "epochs": 6, "acc1": acc,
                     "epoch_seconds": [12.0, 12.0, 16.0, 16.0, 20.0, 20.0], "time_s": 96.0})
    ablation = bench.format_markdown({**results, "summary": bench.summarise(runs, bench.ABLATION_SET, epochs=6)})
    assert "| FLOP ratio | the paper says (DeiT, ImageNet) |" in ablation
    rows_md = {line.split(" | ")[0]: line for line in ablation.splitlines() if line.startswith("| ")}
    assert rows_md["| merging: none (left-out tokens dropped)"].endswith(
        "| each of initialization, expansion and merging adds accuracy: replacing it costs top-1 |")
    assert rows_md["| ToE (after block 0)"].endswith("| no loss of top-1 at about 1.3x |")
    del runs[-3:]
    # against ToE too, paired by seed: full tokens trail it by what it leads them
    assert "| full tokens | 3 | 90.00 ± 0.58 | reference | -0.40 ± 0.15 | " in table
    assert rows[0]["diff_vs_toe_per_seed"] == pytest.approx([-0.5, -0.1, -0.6]) and toe["diff_vs_toe"] is None
    # the seed's shared part: deviations (0, 1, -1) and (0.1, 0.7, -0.8) from the means
    assert toe["corr_with_full"] == pytest.approx(1.5 / np.sqrt(2 * 1.14)) and rows[0]["corr_with_full"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [list(row)[:8] for row in summary] == [["method", "seeds", "top1_mean", "top1_se", "diff_vs_full",
                                                   "diff_se", "time_ratio", "flop_ratio"]] * 2
    # the figure plots what the table pairs: Δ top-1 against the time ratio, full tokens at (1, 0)
    runs.append({"config": "random", "seed": 0, "epochs": 6, "acc1": 88.0, "epoch_seconds": [20.0] * 6,
                 "time_s": 120.0, "untimed": "beside CI"})  # no timed pair: off the time axis
    points = bench.figure_points(bench.summarise(runs, ["full", "toe", "random"], epochs=6))
    assert [(p["method"], p["x"], p["y"]) for p in points] == [
        ("full", 1.0, 0.0), ("toe", pytest.approx(0.8), pytest.approx(0.4))]
    assert points[1]["y_se"] == pytest.approx(toe["diff_se"]) and "(3 seeds): +0.40 ± 0.15 pts" in points[1]["label"]


def test_patchdropout_at_toes_flops_keeps_more_tokens_and_matches_every_stage():
    """patchdrop-flops: the trainer's own schedule keeps 126 and 160 of 196 patch tokens where ToE keeps
    98 and 147, and each stage's step costs ToE's (vit_step_flops, within 0.2 %)."""
    import token_select
    from bench import fashion as bench
    from ToE.deit.main import parse_args

    args = parse_args(bench.method_flags("patchdrop-flops", 6))
    assert args.token_drop == "random" and args.expansion_step == [0, 2, 4]
    kept = token_select.kept_tokens_per_stage(196, args.keep_rate, args.initialization_keep_rate,
                                              args.expansion_multiple_stage)
    assert kept == [126, 160, 196]
    toe = parse_args(bench.method_flags("toe", 6))
    assert token_select.kept_tokens_per_stage(196, toe.keep_rate, toe.initialization_keep_rate,
                                              toe.expansion_multiple_stage) == [98, 147, 196]
    shape = dict(num_prefix_tokens=1, mlp_ratio=4.0, num_classes=10)
    embed = 3.0 * 2.0 * 196 * 12 * 48
    for short, after_block0 in ((126, 98), (160, 147)):
        dropped = token_select.vit_step_flops(short, 48, 4, patch_dim=0, **shape) + embed
        assert dropped == pytest.approx(token_select.vit_step_flops(196, 48, 4, kept_patches=after_block0,
                                                                    patch_dim=12, **shape), rel=2e-3)


def test_the_seeds_plan_follows_the_spread_and_costs_the_missing_runs():
    """seeds_plan: n > (std / 0.3)^2 seeds per method from its paired differences so far and at least 5
    (a spread from fewer is too rough), full tokens as many as the most, each missing run at its method's
    mean wall time; --seeds takes ranges."""
    from bench import fashion as bench

    runs = []
    for seed, (full, toe, tome) in enumerate([(90.0, 90.5, 91.0), (91.0, 91.1, 90.0), (89.0, 89.6, 90.5)]):
        for config, acc in (("full", full), ("toe", toe), ("tome", tome)):
            runs.append({"config": config, "seed": seed, "epochs": 6, "acc1": acc, "epoch_seconds": [10.0] * 6,
                         "time_s": 60.0, "wall_s": 100.0 if config == "full" else 80.0, "eval_wall_s": 20.0})
    summary = bench.summarise(runs, ["full", "toe", "tome"], epochs=6)
    plan = bench.seeds_plan(summary, runs, ["full", "toe", "tome", "patchdrop-flops"], epochs=6, parallel=2)
    toe_std, tome_std = np.std([0.5, 0.1, 0.6], ddof=1), np.std([1.0, -1.0, 1.5], ddof=1)
    assert toe_std / np.sqrt(3) < 0.3 and tome_std / np.sqrt(3) > 0.3
    tome = int((tome_std / 0.3) ** 2) + 1
    assert tome_std / np.sqrt(tome) < 0.3 <= tome_std / np.sqrt(tome - 1)
    methods = plan["methods"]
    assert methods["toe"]["seeds"] == 5 and methods["toe"]["missing"] == 2  # 3 pairs reach 0.3: still 5
    assert methods["tome"]["seeds"] == tome and methods["full"]["seeds"] == tome
    assert methods["patchdrop-flops"] == {"seeds": 5, "have": 0, "missing": 5, "spread": None,
                                          "run_s": pytest.approx(120.0 * bench.flop_ratio("patchdrop-flops", 6))}
    assert methods["tome"]["spread"] == pytest.approx(tome_std)
    assert plan["runs"] == 2 * (tome - 3) + 5 + 2
    assert plan["hours"] == pytest.approx(((tome - 3) * (120.0 + 100.0) + 5 * methods["patchdrop-flops"]["run_s"]
                                           + 2 * 100.0) / 2 / 3600)
    assert plan["commands"] == [f"python -m bench.fashion --methods full tome --seeds 0-{tome - 1} --aa-seeds",
                                "python -m bench.fashion --methods toe patchdrop-flops --seeds 0-4 --aa-seeds"]
    text = bench.plan_text(plan)
    assert "0-" in text and f"tome {tome} (has 3, paired spread {tome_std:.2f})" in text
    assert text.startswith("To bring every paired standard error against full tokens under 0.3")
    # the ablations: each is ToE with one change, so their plan pairs with ToE and adds ToE's seeds,
    # in commands that render the ablation table (no A/A control there)
    for seed, acc in enumerate([90.0, 92.0, 89.0]):
        runs.append({"config": "k1", "seed": seed, "epochs": 6, "acc1": acc, "epoch_seconds": [10.0] * 6,
                     "time_s": 60.0, "wall_s": 80.0, "eval_wall_s": 20.0})
    summary = bench.summarise(runs, ["full", "toe", "k1"], epochs=6)
    plan = bench.seeds_plan(summary, runs, ["full", "toe", "k1"], epochs=6, reference="toe")
    k1_std = np.std([90.0 - 90.5, 92.0 - 91.1, 89.0 - 89.6], ddof=1)
    k1 = int((k1_std / 0.3) ** 2) + 1
    assert set(plan["methods"]) == {"k1", "toe"} and plan["methods"]["toe"]["seeds"] == k1 > 3
    assert plan["commands"] == [f"python -m bench.fashion --ablations --methods toe k1 --seeds 0-{k1 - 1}"]
    for seed in range(3, k1 + 2):  # ToE already has the seeds the plan asks: its name leaves the command
        runs.append({**runs[1], "seed": seed})
    plan = bench.seeds_plan(summary, runs, ["full", "toe", "k1"], epochs=6, reference="toe")
    assert plan["methods"]["toe"]["missing"] == 0
    assert plan["commands"] == [f"python -m bench.fashion --ablations --methods k1 --seeds 0-{k1 - 1}"]
    assert bench.plan_text(plan).startswith("To bring every paired standard error against ToE under 0.3")
    parser = bench.build_parser()
    assert parser.parse_args(["--seeds", "0-3", "7"]).seeds == [[0, 1, 2, 3], [7]]
    for bad in ("3-1", "a", "-2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seeds", bad])


def test_the_table_names_every_command_that_trained_its_runs(tmp_path, monkeypatch):
    """A table built by several bench commands (more seeds later) lists each with its commit and run
    count; an older results.json's single command is the first; --render and a rerun that trains
    nothing keep the list as it is."""
    from bench import fashion as bench
    from bench.common import append_run

    out = tmp_path / "out"
    out.mkdir()
    recipe = "r1"

    def run(config, seed):
        return {"config": config, "seed": seed, "recipe": recipe, "epochs": 6, "grid": 14, "acc1": 90.0 + seed,
                "epoch_seconds": [10.0] * 6, "time_s": 60.0, "load_before": [1.0], "load_after": [1.0]}

    for seed in (0, 1):
        for config in ("full", "toe"):
            append_run(str(out / "runs.jsonl"), run(config, seed))
    (out / "results.json").write_text(json.dumps({"command": "python -m bench.fashion --seeds 0 1",
                                                  "commit": "abc1234", "recipe": recipe,
                                                  "notes": ["What the first two seeds show."]}))

    def fake_run_all(methods, seeds, aa_seeds, args, runs_path, log=print):
        done = {(r["config"], r["seed"]) for r in bench.read_runs(runs_path)}
        for seed in seeds:
            for config in methods:
                if (config, seed) not in done:
                    append_run(runs_path, run(config, seed))
        return bench.read_runs(runs_path)

    monkeypatch.setattr(bench, "recipe_key", lambda args: recipe)
    monkeypatch.setattr(bench, "build_subset", lambda *a, **k: str(tmp_path / "subset"))
    monkeypatch.setattr(bench, "run_all", fake_run_all)
    monkeypatch.setattr(bench, "git_commit", lambda: "def5678")
    monkeypatch.setattr(fashion, "build_fashion", lambda *a, **k: None)
    train = ["--out", str(out), "--figure", "", "--methods", "full", "toe", "--seeds", "0", "1", "2", "--aa-seeds"]
    bench.main(train)
    stored = json.loads((out / "results.json").read_text())
    assert "runs" not in stored and stored["runs_file"] == "runs.jsonl"  # the runs live once, in runs.jsonl
    sessions = stored["sessions"]
    assert [(s["command"], s["commit"], s.get("trained")) for s in sessions] == [
        ("python -m bench.fashion --seeds 0 1", "abc1234", None),
        ("python -m bench.fashion " + " ".join(train), "def5678", 2)]
    table = (out / "table.md").read_text()
    assert table.startswith("Commands: `python -m bench.fashion --seeds 0 1` (commit abc1234); `python -m "
                            "bench.fashion --out") and "(commit def5678, 2 runs)." in table
    assert "| ToE (after block 0) | 3 |" in table
    assert table.endswith("\n\nWhat the first two seeds show.\n")  # the notes written by hand stay
    bench.main(train)  # nothing left to train
    bench.main(["--render", "--out", str(out), "--figure", ""])
    assert json.loads((out / "results.json").read_text())["sessions"] == sessions


def test_a_failed_or_interrupted_run_starts_no_other(tmp_path, monkeypatch):
    """Ctrl-C reaches the trainers before the bench: a run that dies must not let its worker take
    the next job while another run is still in flight (the bench once started one more run after
    Ctrl-C); the finished run is kept, the failure raised."""
    import threading
    import time
    from types import SimpleNamespace

    from bench import fashion as bench

    started, failed = [], threading.Event()

    def fake_run_one(method, seed, args, neighbours, log=print):
        started.append((method, seed))
        if (method, seed) == ("toe", 0):
            failed.set()
            raise RuntimeError("trainer failed (exit -2)")
        # in flight until the other run has died and a while after, however loaded the machine:
        # the main thread waits on this run while the other worker is free to take the next job
        failed.wait(10)
        time.sleep(0.3)
        return {"config": method, "seed": seed, "recipe": "r1", "acc1": 90.0}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    args = SimpleNamespace(recipe="r1", parallel=2)
    runs_path = str(tmp_path / "runs.jsonl")
    with pytest.raises(RuntimeError, match="exit -2"):
        bench.run_all(["full", "toe"], [0, 1], [], args, runs_path, log=lambda *a: None)
    assert sorted(started) == [("full", 0), ("toe", 0)]
    assert [(r["config"], r["seed"]) for r in bench.read_runs(runs_path)] == [("full", 0)]


def test_sigterm_lets_the_runs_in_flight_finish_and_starts_no_other(tmp_path, monkeypatch):
    """A bench started with & ignores Ctrl-C; SIGTERM (kill PID) stops it between runs: both runs in
    flight finish and are kept, none of the next seed starts, and it ends as a preempted trainer
    (Preempted, exit 3) saying how many runs were not started. The handler is gone afterwards."""
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from bench import fashion as bench
    from ToE.common.errors import Preempted

    started, told, both = [], threading.Event(), threading.Barrier(2, timeout=10)

    def log(message):
        if "SIGTERM" in message:
            told.set()

    def fake_run_one(method, seed, args, neighbours, log=print):
        started.append((method, seed))
        both.wait()  # both runs in flight before the signal
        if method == "full":  # to this worker thread, once the main thread waits for the runs: the case
            time.sleep(0.3)    # where it must wake to see the signal (a blocked wait would miss it for 10 s)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        assert told.wait(10)
        return {"config": method, "seed": seed, "recipe": "r1", "acc1": 90.0}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    before = signal.getsignal(signal.SIGTERM)
    runs_path = str(tmp_path / "runs.jsonl")
    with pytest.raises(Preempted, match="2 runs not started"):
        bench.run_all(["full", "toe"], [0, 1], [], SimpleNamespace(recipe="r1", parallel=2), runs_path, log=log)
    assert sorted(started) == [("full", 0), ("toe", 0)]
    assert sorted((r["config"], r["seed"]) for r in bench.read_runs(runs_path)) == [("full", 0), ("toe", 0)]
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_repeated_stops_between_runs_on_sigterm(tmp_path):
    """The sequential benches (bench.common.run_repeated) stop the same way."""
    import signal

    from bench.common import read_runs, run_repeated
    from ToE.common.errors import Preempted

    def run_one(config, seed):
        if (config, seed) == ("a", 0):
            os.kill(os.getpid(), signal.SIGTERM)
        return {"config": config, "seed": seed}

    runs_path = str(tmp_path / "runs.jsonl")
    with pytest.raises(Preempted, match="3 runs not started"):
        run_repeated(["a", "b"], [0, 1], run_one, runs_path, log=lambda *a: None)
    assert [(r["config"], r["seed"]) for r in read_runs(runs_path)] == [("a", 0)]
    assert [(r["config"], r["seed"]) for r in run_repeated(["a", "b"], [0, 1], run_one, runs_path,
                                                           log=lambda *a: None)] == [
        ("a", 0), ("b", 0), ("b", 1), ("a", 1)]


def test_a_stopped_bench_still_records_its_session_and_table(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM mid-bench: the runs it finished are in the table and its command in the
    sessions (with what stopped it), then it ends as it was stopped (before, the session was lost)."""
    from bench import fashion as bench
    from bench.common import append_run

    out = tmp_path / "out"

    def fake_run_all(methods, seeds, aa_seeds, args, runs_path, log=print):
        for config in ("full", "toe"):
            append_run(runs_path, {"config": config, "seed": 0, "recipe": "r1", "epochs": 6, "grid": 14,
                                   "acc1": 90.0, "epoch_seconds": [10.0] * 6, "time_s": 60.0,
                                   "load_before": [1.0], "load_after": [1.0]})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "recipe_key", lambda args: "r1")
    monkeypatch.setattr(bench, "build_subset", lambda *a, **k: str(tmp_path / "subset"))
    monkeypatch.setattr(bench, "run_all", fake_run_all)
    monkeypatch.setattr(bench, "git_commit", lambda: "def5678")
    monkeypatch.setattr(fashion, "build_fashion", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(out), "--figure", "", "--methods", "full", "toe", "--seeds", "0", "1"])
    sessions = json.loads((out / "results.json").read_text())["sessions"]
    assert [(s["trained"], s["stopped"]) for s in sessions] == [(2, "KeyboardInterrupt")]
    table = (out / "table.md").read_text()
    assert "(commit def5678, 2 runs, stopped (KeyboardInterrupt))" in table and "| ToE (after block 0) | 1 |" in table


def test_the_ablations_change_one_thing_each_and_parse_as_the_trainer_reads_them():
    """bench.fashion --ablations: each row is ToE with one change, read by DeiT's own parser (the
    last of a repeated flag wins); the FLOP ratios follow the schedules."""
    from bench.fashion import ABLATIONS, flop_ratio, method_flags
    from ToE.deit.main import parse_args

    toe = vars(parse_args(method_flags("toe", 6)))
    changed = {}
    for name in ABLATIONS:
        args = vars(parse_args(method_flags(name, 6)))
        changed[name] = {key for key in args if args[key] != toe[key]}
    assert changed["init-random"] == {"initialization"} and changed["merge-drop"] == {"merging"}
    assert changed["expand-none"] == {"expansion"} and changed["manhattan"] == {"distance"}
    assert changed["k1"] == changed["k3"] == {"expansion_multiple_stage"}
    assert changed["r0-0.20"] == {"keep_rate", "initialization_keep_rate"}
    assert changed["hyper"] == {"expansion_step"}
    assert vars(parse_args(method_flags("hyper", 6)))["expansion_step"] == [0, 3, 5]
    assert flop_ratio("r0-0.20", 6) < flop_ratio("toe", 6) < flop_ratio("r0-0.30", 6) < flop_ratio("r0-0.40", 6) < 1
    assert flop_ratio("hyper", 6) < flop_ratio("toe", 6)
