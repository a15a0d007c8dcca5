"""The run lifecycle's promises, checked for every trainer alike (``ToE/common/lifecycle.py``).

One entry per trainer in ``TRAINERS``: its main.py, a tiny CPU recipe, the data it trains on and
the training step at which a SIGTERM lands in the middle of epoch 1. Every test is parametrised
over the entries, so a new trainer gets the whole matrix by adding one:
- user errors are one line, exit 2, no traceback;
- 2 epochs, then --auto-resume for the rest, equals the uninterrupted run (weights, optimizer);
- SIGTERM mid-epoch exits 3 with a checkpoint at that step; --auto-resume then equals the
  uninterrupted run; a re-submitted finished run does nothing;
- kill -9 while a checkpoint is written leaves the previous one loadable, and the run continues;
- a folder that holds another run is refused;
- training and evaluation on 2 processes whose collectives refuse CPU tensors, as NCCL does.
The signal and the kill come from inside the run at a chosen step (a wrapper around main.py), so
nothing depends on timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, child_env, load, run_script, write_coco, write_images

CLASSIFY_FAST = ["--device", "cpu", "--num_workers", "0", "--no-pin-mem", "--lr", "1e-3", "--log-interval", "1"]
TRAINERS = {
    # 24 train images, batch 4: 6 steps an epoch; step 9 is step 3 of epoch 1
    "deit": dict(main="ToE/deit/main.py", data="images", epochs=4, sigterm_at=9, flags=[
        "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--input-size", "16", "--patch-size", "4", *CLASSIFY_FAST, "--batch-size", "4", "--warmup-epochs", "1",
        "--unscale-lr", "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--model-ema-decay",
        "0.9", "--expansion-step", "0", "1", "2", "--keep-rate", "0.5", "0.75", "1.0"]),
    # --epochs 3 and 1 cooldown epoch: 4 epochs are trained
    "lvvit": dict(main="ToE/lvvit/main.py", data="images", epochs=3, trained=4, sigterm_at=9, flags=[
        "--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
        "--img-size", "16", "--patch-size", "4", "--crop-pct", "1.0", *CLASSIFY_FAST, "-b", "4",
        "--warmup-epochs", "0", "--cooldown-epochs", "1", "--model-ema-decay", "0.9",
        "--expansion-step", "0", "2", "3", "--keep-rate", "0.4", "0.7", "1.0", "--initialization-keep-rate", "0.2"]),
    # 5 epochs, one per segment (24, 24, 24, 28, 32 px); batch 8 at low resolution (3 steps an
    # epoch), 4 x 2 accumulation at full: step 5 is step 2 of epoch 1
    "et": dict(main="ToE/EfficientTrain/main.py", data="images", epochs=5, sigterm_at=5, flags=[
        "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
        "--input-size", "32", "--patch-size", "4", *CLASSIFY_FAST, "--batch-size", "4", "--global-batch", "8",
        "--warmup-epochs", "1", "--unscale-lr", "--no-repeated-aug", "--aa", "rand-m9-mstd0.5-inc1",
        "--model-ema-decay", "0.9", "--expansion-step", "0", "2", "4", "--keep-rate", "0.6", "0.8", "1.0",
        "--initialization-keep-rate", "0.3", "--initialization", "uniform"]),
    # 8 train canvases, batch 2: 4 steps an epoch; step 6 is step 2 of epoch 1
    "yolos": dict(main="ToE/yolos/main.py", data="coco", epochs=4, sigterm_at=6, flags=[
        "--backbone_name", "vit_tiny_patch16_224", "--backbone-kwargs", "img_size=32", "patch_size=8",
        "embed_dim=32", "depth=3", "num_heads=2", "--det_token_num", "5", "--init_pe_size", "32", "32",
        "--mid_pe_size", "32", "32", "--scales", "24", "32", "40", "--max-size", "56", "--select-scales", "24", "32",
        "--crop-size", "16", "24", "--eval_size", "32", "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
        "--lr", "1e-3", "--log-interval", "1", "--expansion-step", "1", "2", "3", "--seed", "0"]),
}
NAMES = list(TRAINERS)

# main.py with a training step that sends the process SIGTERM at the N-th step of the run, or a
# checkpoint write that is killed before the rename, or collectives that refuse CPU tensors
# outside the one reduction helper (ToE/common/distributed.py), as NCCL does.
WRAPPER = """
import inspect, os, runpy, signal, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import ToE.common.checkpoint as checkpoint
from ToE.common.lifecycle import Run

mode, when = {mode!r}, {when!r}
if mode == "signal":
    steps, calls = Run.train_steps, [0]

    def train_steps(self, *args):
        step = self.task.train_step

        def counted(model, batch):
            calls[0] += 1
            if calls[0] == when:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(model, batch)
        self.task.train_step = counted
        try:
            return steps(self, *args)
        finally:
            self.task.train_step = step
    Run.train_steps = train_steps
elif mode == "kill":
    replace, writes = os.replace, [0]

    def dying_replace(src, dst):
        if os.path.basename(dst) == "checkpoint.pth":
            writes[0] += 1
            if writes[0] == when:  # the new checkpoint is in .tmp; die before it replaces the old one
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    checkpoint.os.replace = dying_replace
elif mode == "nccl":
    helper = os.path.join({root!r}, "ToE", "common", "distributed.py")

    def strict(collective):
        def call(tensor, *args, **kwargs):
            caller = inspect.stack()[1].filename
            if getattr(tensor, "device", None) is not None and tensor.device.type == "cpu" and caller != helper:
                raise RuntimeError("No backend type associated with device type cpu")
            return collective(tensor, *args, **kwargs)
        return call
    for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        setattr(dist, name, strict(getattr(dist, name)))
main = os.path.join({root!r}, {main!r})
sys.argv = [main] + sys.argv[1:]
runpy.run_path(main, run_name="__main__")
"""


def trained(name: str) -> int:
    """Epochs the entry's run trains (--epochs, plus cooldown epochs where the entry has them)."""
    return TRAINERS[name].get("trained", TRAINERS[name]["epochs"])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    coco = tmp_path_factory.mktemp("coco")
    write_coco(str(coco))
    return {"images": write_images(tmp_path_factory.mktemp("images")), "coco": coco}


class Trainer:
    """One entry of TRAINERS: run its main.py (or the wrapper) on its data."""

    def __init__(self, name: str, datasets, tmp_path: Path) -> None:
        self.name, self.entry, self.tmp = name, TRAINERS[name], tmp_path
        self.data = datasets[self.entry["data"]]

    def argv(self, out, *extra):
        return ["--data-path", str(self.data), "--output_dir", str(out), "--epochs", str(self.entry["epochs"]),
                *self.entry["flags"], *map(str, extra)]

    def run(self, out, *extra, mode=None, when=0, launcher=()):
        if mode is None:
            command = [*launcher, str(ROOT / self.entry["main"])]
        else:
            script = self.tmp / f"wrapper_{mode}.py"
            script.write_text(WRAPPER.format(root=str(ROOT), main=self.entry["main"], mode=mode, when=when))
            command = [*launcher, str(script)]
        if not launcher:
            command = [sys.executable, *command]
        return subprocess.run([*command, *self.argv(out, *extra)], cwd=ROOT, env=child_env(), capture_output=True,
                              text=True, timeout=300, check=False)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def assert_same_weights(a, b, what):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]}"


def read_epochs(out: Path):
    import json

    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def straight(datasets, tmp_path_factory):
    """The uninterrupted run of every trainer, trained once per module."""
    runs = {}

    def get(name):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"straight-{name}")
            ok(Trainer(name, datasets, tmp).run(tmp / "out"))
            runs[name] = load(tmp / "out" / "checkpoint.pth")
        return runs[name]
    return get


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_user_errors_are_one_line(name, datasets, tmp_path):
    trainer = Trainer(name, datasets, tmp_path)
    for extra, needle in ((["--keep-rate", "0.5", "1.0"], "bad ToE schedule"),
                          (["--resume", tmp_path / "missing.pth"], "does not exist"),
                          (["--amp-dtype", "float16", "--device", "cpu"], "float16 needs a GPU"),
                          (["--time-limit", "soon"], "is not a duration")):
        result = trainer.run(tmp_path / "out", *extra)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_two_epochs_then_auto_resume_equals_the_straight_run(name, datasets, straight, tmp_path):
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    ok(trainer.run(out, "--stop-after-epochs", 2, "--auto-resume"))
    assert load(out / "checkpoint.pth")["epoch"] == 1
    ok(trainer.run(out, "--auto-resume"))
    resumed, reference = load(out / "checkpoint.pth"), straight(name)
    assert_same_weights(reference["model"], resumed["model"], f"{name}: straight vs 2 + rest")
    assert_same_weights(reference["optimizer"]["state"][0], resumed["optimizer"]["state"][0], "optimizer moments")
    assert read_epochs(out) == list(range(trained(name)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_sigterm_mid_epoch_then_auto_resume_equals_the_straight_run(name, datasets, straight, tmp_path):
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    stopped = trainer.run(out, "--auto-resume", mode="signal", when=TRAINERS[name]["sigterm_at"])
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped: SIGTERM received in epoch 1 after step" in stopped.stderr and "Traceback" not in stopped.stderr
    position = load(out / "checkpoint.pth")["position"]
    assert position["epoch"] == 1 and position["step"] > 0
    assert read_epochs(out) == [0]
    ok(trainer.run(out, "--auto-resume"))  # the same command, re-submitted
    resumed, reference = load(out / "checkpoint.pth"), straight(name)
    assert "position" not in resumed
    assert_same_weights(reference["model"], resumed["model"], f"{name}: straight vs SIGTERM + resumed")
    if reference.get("model_ema") is not None:
        assert_same_weights(reference["model_ema"], resumed["model_ema"], f"{name}: EMA")
    assert read_epochs(out) == list(range(trained(name)))
    assert "nothing to do" in ok(trainer.run(out, "--auto-resume")).stdout  # a requeued job after the end


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_kill_9_while_writing_a_checkpoint_keeps_the_last_one(name, datasets, straight, tmp_path):
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    killed = trainer.run(out, mode="kill", when=2)  # dies writing epoch 1's checkpoint
    assert killed.returncode == -9
    assert load(out / "checkpoint.pth")["epoch"] == 0
    ok(trainer.run(out, "--auto-resume"))
    assert_same_weights(straight(name)["model"], load(out / "checkpoint.pth")["model"], f"{name}: killed + resumed")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_a_folder_holding_another_run_is_refused(name, datasets, tmp_path):
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    result = trainer.run(out)
    assert result.returncode == 2 and "holds another run" in result.stderr and "Traceback" not in result.stderr
    assert (out / "log.txt").read_text() == '{"epoch": 0}\n'


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_two_processes_whose_collectives_refuse_cpu_tensors(name, datasets, tmp_path):
    """As under NCCL: every reduction of training and evaluation goes through the helper that moves
    CPU tensors to the process's GPU; a direct dist.all_reduce of a CPU tensor fails this run."""
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    result = trainer.run(out, "--stop-after-epochs", 2, mode="nccl", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_epochs(out) == [0, 1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_nodes_that_found_different_checkpoints_are_refused_in_one_line(datasets, straight, tmp_path):
    """Node-local output folders: one node holds checkpoint.pth (epoch 0), the other none. Without
    the agreement, one would resume at epoch 1 and the other start at 0, out of step."""
    trainer = Trainer("deit", datasets, tmp_path)
    folders = [tmp_path / "node0", tmp_path / "node1"]
    folders[0].mkdir()
    torch.save(dict(straight("deit"), epoch=0), folders[0] / "checkpoint.pth")
    endpoint = f"127.0.0.1:{_free_port()}"
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "nodes",
                                  str(ROOT / TRAINERS["deit"]["main"]), *trainer.argv(folder, "--auto-resume")],
                                 cwd=ROOT, env={**child_env(), "GLOO_SOCKET_IFNAME": "lo"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for folder in folders]
    errors = "".join(launch.communicate(timeout=240)[1] for launch in launches)
    assert all(launch.returncode != 0 for launch in launches)
    assert errors.count("error: the processes found different checkpoints to resume") == 1, errors[-3000:]
    assert 'File "' + str(ROOT / "ToE") not in errors, "a traceback of ours (torchrun may print its own)"
    assert load(folders[0] / "checkpoint.pth")["epoch"] == 0 and not (folders[1] / "checkpoint.pth").exists()


def test_amp_auto_picks_bf16_only_where_the_gpu_computes_it(monkeypatch):
    from ToE.common.distributed import resolve_amp_dtype

    cuda = torch.device("cuda", 0)
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):  # A100/H100 vs T4/V100
        # a T4 or V100 "supports" bf16 only through emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert resolve_amp_dtype("auto", cuda) is expected
    assert resolve_amp_dtype("auto", torch.device("cpu")) is None


def test_an_fp16_resume_of_a_checkpoint_without_loss_scale_starts_a_fresh_one(capsys):
    """A bf16/fp32/CPU checkpoint holds an empty scaler state; an fp16 resume must not load it
    (GradScaler.load_state_dict raises on an empty dict) but start a fresh scale."""
    from ToE.common.lifecycle import Run

    class Scaler:
        loaded = None

        def is_enabled(self):
            return self.enabled

        def load_state_dict(self, state):
            if not state:
                raise RuntimeError("The source state dict is empty")
            self.loaded = state

    run = Run.__new__(Run)
    run.env = type("Env", (), {"is_main": True})()
    for enabled, state, loaded in ((True, {}, None), (True, {"scale": 8.0}, {"scale": 8.0}), (False, {"scale": 8.0},
                                                                                               None)):
        run.scaler = Scaler()
        run.scaler.enabled = enabled
        run._load_scaler(state, {"amp_dtype": "bfloat16"})
        assert run.scaler.loaded == loaded
    assert "float16 starts a fresh loss scale" in capsys.readouterr().out


@pytest.mark.e2e
def test_yolos_trains_in_bf16_on_the_cpu(datasets):
    """--amp-dtype bfloat16: the detector's blocks compute in bf16 under autocast (the lifecycle's
    AMP, the same as classification's), the operator still keeps the scheduled tokens."""
    import math

    from ToE.common.lifecycle import Run
    from ToE.yolos.main import parse_args
    from ToE.yolos.trainer import DetectionTask

    argv = Trainer("yolos", datasets, Path("/nonexistent")).argv("", "--amp-dtype", "bfloat16")
    run = Run(parse_args(argv[:2] + argv[4:]), DetectionTask)  # no --output_dir: nothing written
    seen = []
    run.task.model.backbone.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: seen.append((o.dtype, o.shape[1])))
    records = []
    run.log = type("Log", (), {"write": lambda self, record, step=None: records.append(record),
                                "write_step": lambda self, record, image: None})()
    run.train_epoch(1)  # stage 1: half of the patch tokens
    kept = [tokens - 1 - 5 for _, tokens in seen[:4]]  # 4 training steps: class token, patches, 5 detection tokens
    assert {dtype for dtype, _ in seen[:4]} == {torch.bfloat16}
    # published YOLOS evaluates in float32 (--eval-amp would evaluate in bf16 too)
    assert {dtype for dtype, _ in seen[4:]} == {torch.float32}
    # the logged count is the mean of what the forwards ran on, below the (multi-scale) patch count
    assert records[0]["kept_tokens"] == sum(kept) / 4 < records[0]["patch_tokens"]
    assert math.isfinite(records[0]["train_loss"]) and 0.0 <= records[0]["test_AP"] <= 1.0


# -- issue 18: the classes of user mistakes, closed in the shared code -----------------------------

IDENTITY_CHANGES = {  # a flag of each trainer's own that changes what the run computes
    "deit": ["--smoothing", "0.2"], "lvvit": ["--cooldown-epochs", "2"], "et": ["--token-drop", "random"],
    "yolos": ["--eos_coef", "0.2"]}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.e2e
def test_resume_with_any_flag_that_changes_the_run_is_refused(name, datasets, straight, tmp_path):
    """Every flag that changes what a run computes is part of its identity (the seed too), not a
    hand-kept list per trainer: resuming with another value would bend the run in silence."""
    trainer, out = Trainer(name, datasets, tmp_path), tmp_path / "out"
    out.mkdir()
    torch.save(dict(straight(name), epoch=0), out / "checkpoint.pth")
    before = (out / "checkpoint.pth").read_bytes()
    for change in (IDENTITY_CHANGES[name], ["--seed", "7"]):
        result = trainer.run(out, "--auto-resume", *change)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        shown = change[0].replace("_", "-") if change[0] == "--eos_coef" else change[0]
        assert f"this run gives {shown} {change[1]}" in lines[0], lines[0]
    assert (out / "checkpoint.pth").read_bytes() == before
    # what does not change the computation may differ: the loader workers, the log interval
    ok(trainer.run(out, "--auto-resume", "--stop-after-epochs", 1, "--log-interval", 2))


@pytest.mark.parametrize("name", ["deit", "lvvit", "et"])
@pytest.mark.e2e
def test_an_augmentation_policy_timm_would_half_ignore_is_refused(name, datasets, tmp_path):
    """timm passes over a part of --aa without a digit in silence: rand-zz trained RandAugment at
    magnitude 10, rand-m9-zz at 9 with zz dropped."""
    trainer = Trainer(name, datasets, tmp_path)
    for policy in ("rand-zz", "rand-m9-zz-inc1"):
        result = trainer.run(tmp_path / "out", "--aa", policy)
        assert result.returncode == 2 and "timm would skip" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_launchers_do_not_turn_overwrite_into_a_resume(tmp_path):
    """The run scripts add --auto-resume, which would continue the old run that --overwrite asked
    to replace; Slurm would delete the run at every requeue."""
    script = ROOT / "ToE" / "deit" / "run" / "imagenet_small_run1.sh"
    plain = run_script(script, "/data/imagenet", "runs/x", cwd=tmp_path, DRY_RUN="1")
    fresh = run_script(script, "/data/imagenet", "runs/x", "--overwrite", cwd=tmp_path, DRY_RUN="1")
    assert "--auto-resume" in plain.stdout.split()
    assert "--overwrite" in fresh.stdout.split() and "--auto-resume" not in fresh.stdout.split()
    slurm = subprocess.run(["bash", str(ROOT / "run" / "slurm.sh"), str(ROOT / "ToE" / "deit" / "main.py"),
                            "--output_dir", "x", "--overwrite"], env={**child_env(), "DRY_RUN": "1"},
                           capture_output=True, text=True, timeout=60)
    assert slurm.returncode == 2 and "--overwrite in a requeued job" in slurm.stderr


@pytest.mark.e2e
def test_lvvit_run_scripts_run_on_a_cpu(tmp_path):
    """The published recipe asked for fp16 (--apex-amp), which a CPU cannot run; the scripts leave
    the precision to --amp-dtype auto (off on a CPU), and their command parses."""
    from ToE.lvvit.main import parse_args

    for size in ("small", "medium"):
        result = run_script(ROOT / "ToE" / "lvvit" / "run" / f"imagenet_{size}_run1.sh", "/d", "/l", "/o",
                            cwd=tmp_path, DRY_RUN="1")
        assert result.returncode == 0, result.stderr
        argv = result.stdout.split()
        args = parse_args(argv[argv.index(next(a for a in argv if a.endswith("main.py"))) + 1:])
        assert args.amp_dtype == "auto" and args.device == "cpu"
        assert (args.epochs, args.cooldown_epochs) == (300, 10)  # 310 epochs in all, cosine over 300
