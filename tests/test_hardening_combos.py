"""Issue 27, "feature combinations nobody tried": VPT with the random-drop baseline, VPT and random drop
on LV-ViT, fine-tuning LV-ViT to another class count, the FLOP prediction of a VPT run, and what
``token_select.attach`` refuses (models that cannot run on fewer tokens, a bad ``block_index``)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from helpers import ROOT, assert_user_error, run_main

import token_select
import ToE.lvvit  # noqa: F401  (registers the LV-ViT models)
from ToE import flops
from ToE.common.args import build_token_select
from ToE.common.classification import ClassificationTask
from ToE.common.errors import UserError
from ToE.common.pretrained import finetune
from ToE.common.vpt import add_prompts

VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
       "--input-size", "16", "--patch-size", "4", "--device", "cpu"]
LVVIT = ["--model", "lvvit_digits", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "stem_dim=8",
         "--img-size", "16", "--patch-size", "4", "--device", "cpu"]


def _task(*flags, classes=3):
    """A classification task with just what ``build_model`` and ``_check_model`` read (no data)."""
    from ToE.deit.main import parse_args

    args = parse_args(["--data-path", "unused", *VIT, *flags])
    task = ClassificationTask.__new__(ClassificationTask)
    task.args, task.num_classes, task.device = args, classes, torch.device("cpu")
    task.env, task.toe = SimpleNamespace(is_main=True), build_token_select(args)
    return task


# -- VPT with --token-drop random ------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [False, True])
def test_random_drop_with_vpt_drops_random_patches_and_the_blocks_see_the_prompts(deep):
    """PatchDropout runs before block 0 puts the prompts in: its prefix is the class token alone. With the
    operator's count (class + prompts) it kept the first N patch tokens of every image."""
    task = _task("--vpt", "deep" if deep else "shallow", "--prompt-tokens", "3", "--token-drop", "random")
    model = task.build_model().train()
    model.patch_drop.prob = 0.5  # 16 patches -> 8 kept
    seen, after = [], []
    model.patch_drop.register_forward_hook(lambda module, args, out: seen.append((args[0].detach(), out.detach())))
    model.blocks[1].register_forward_pre_hook(lambda block, args: after.append(args[0].shape[1]))
    torch.manual_seed(0)
    for _ in range(3):
        model(torch.randn(2, 3, 16, 16))
    first_three_always = True
    for full, kept in seen:
        assert kept.shape[1] == 1 + 8 and torch.equal(kept[:, 0], full[:, 0])  # the class token, then 8 patches
        for sample in range(full.shape[0]):
            positions = [int((full[sample] == row).all(dim=1).nonzero()[0]) for row in kept[sample, 1:]]
            first_three_always &= set(range(1, 4)) <= set(positions)
    assert not first_three_always  # random patches, not always the first 3 (one per prompt)
    assert after == [1 + 3 + 8] * 3  # block 1: class token, the 3 prompts, the 8 kept patches


# -- LV-ViT with VPT or the random baseline: refused up front -------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [(["--vpt", "deep", "--finetune", "w.pth"], "--vpt"),
                                           (["--token-drop", "random"], "--token-drop random")])
def test_lvvit_refuses_vpt_and_random_drop_before_any_work(flags, needle):
    from ToE.lvvit.main import parse_args
    from ToE.lvvit.trainer import LVViTTask

    with pytest.raises(UserError, match=needle):
        LVViTTask.check_flags(parse_args(["--data-path", "unused", *LVVIT, *flags]))


@pytest.mark.e2e
def test_lvvit_vpt_is_one_line_before_the_data_is_read(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("lvvit_digits", embed_dim=32, depth=2, num_heads=2, stem_dim=8, img_size=16,
                                 patch_size=4).state_dict(), weights)
    result = run_main("--data-path", tmp_path / "no-data", *LVVIT, "--finetune", weights, "--vpt", "shallow",
                      "--output_dir", tmp_path / "out", cmd=[sys.executable, str(ROOT / "ToE" / "lvvit" / "main.py")])
    assert_user_error(result, "--vpt", "LV-ViT")
    assert not (tmp_path / "out").exists()


# -- fine-tuning LV-ViT to another class count ----------------------------------------------------------------
def _lvvit(classes):
    return timm.create_model("lvvit_digits", num_classes=classes, embed_dim=32, depth=2, num_heads=2, stem_dim=8,
                             img_size=16, patch_size=4)


def test_finetune_lvvit_to_another_class_count_drops_both_heads(tmp_path):
    torch.manual_seed(0)
    source = _lvvit(10)
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    target = _lvvit(3)
    fresh = {key: value.clone() for key, value in target.state_dict().items()}
    notes = finetune(target, str(tmp_path / "checkpoint.pth"))
    assert len(notes) == 1 and "another class count" in notes[0] and "aux_head.weight" in notes[0]
    for key, value in target.state_dict().items():
        expected = fresh[key] if key.startswith(("head.", "aux_head.")) else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_classifier_heads_are_found_from_the_model():
    from ToE.common.pretrained import classifier_heads

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert classifier_heads(_lvvit(3)) == ("head.", "aux_head.")
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, **kw)
    assert classifier_heads(distilled) == ("head.", "head_dist.")
    # a class count equal to the width: the blocks' linears are no heads, only the model's own children count
    assert classifier_heads(timm.create_model("vit_tiny_patch16_224", num_classes=32, **kw)) == ("head.",)


def test_distilled_into_plain_of_the_same_class_count_drops_no_head(tmp_path):
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", **kw)
    torch.save(distilled.state_dict(), tmp_path / "d.pth")
    plain = timm.create_model("vit_tiny_patch16_224", **kw)
    notes = finetune(plain, str(tmp_path / "d.pth"))  # the distillation head goes with its token
    assert not any("another class count" in note for note in notes)
    assert torch.equal(plain.head.weight, distilled.head.weight)


# -- the FLOPs of a VPT run -------------------------------------------------------------------------------------
def _vpt_vit(deep, prompts=5):
    model = flops.create_model("vit_tiny_patch16_224", 32, 4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    add_prompts(model, prompts, deep=deep)
    return model


@pytest.mark.parametrize("deep", [False, True])
def test_analytic_flops_of_a_vpt_model_count_the_prompts_in_every_block(deep):
    model = _vpt_vit(deep)
    shape = flops.model_shape(model)
    assert shape["num_prefix_tokens"] == 1 + 5 and shape["prompt_tokens"] == 5
    operator = token_select.TokenSelect([0], [0.5], 0.25)
    token_select.attach(model, operator)
    operator.num_prefix_tokens = shape["num_prefix_tokens"]
    operator.update_current_stage(0)
    for reducing in (True, False):
        operator.current_stage = 1 if reducing else 0
        kept = operator.kept_patch_tokens(64)
        counted = flops.count_step_flops(model, 32)
        assert abs(counted / flops.analytic_step_flops(shape, kept) - 1) < 0.02, (reducing, kept)


def test_flops_calculator_takes_vpt():
    report = flops.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=3",
                         "num_heads=2", "--input-size", "32", "--patch-size", "4", "--epochs", "2", "--expansion-step",
                         "0", "1", "--keep-rate", "0.5", "1.0", "--vpt", "deep", "--prompt-tokens", "5"])
    assert [row["tokens_after_block0"] for row in report["stages"]] == [1 + 5 + 32, 1 + 5 + 64]
    assert abs(report["run"]["ideal_speedup_counted"] / report["run"]["ideal_speedup_analytic"] - 1) < 0.02


def test_summary_predicts_the_speed_of_a_vpt_run_with_its_prompts(tmp_path):
    from ToE.common.summary import summarise

    args = {"model": "vit_tiny_patch16_224", "model_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2},
            "input_size": 32, "patch_size": 4, "num_classes": 10, "epochs": 2, "vpt": "deep", "prompt_tokens": 5}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
    records = [{"epoch": e, "stage": e + 1, "kept_tokens": kept, "epoch_seconds": 1.0 + e, "test_acc1": 50.0}
               for e, kept in enumerate((32, 64))]
    (tmp_path / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = summarise(str(tmp_path))
    shape = flops.model_shape(_vpt_vit(True))
    expected = flops.analytic_step_flops(shape, 64) / flops.analytic_step_flops(shape, 32)
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.rstrip(" |").endswith(f"{expected:.2f}x") and "5 deep VPT prompt tokens" in text


# -- attach: models that cannot run on fewer tokens, and block_index ----------------------------------------------
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
REFUSED = [("beit_base_patch16_224", {}, "relative-position"),
           ("vit_relpos_base_patch16_224", {}, "relative-position"),
           ("eva02_tiny_patch14_224", {}, "rotary"),
           ("vit_base_patch16_rope_224", {}, "rotary"),
           ("convit_tiny", {"local_up_to_layer": 1}, "gated positional"),
           ("cait_xxs24_224", {"depth_token_only": 1}, "class-attention"),
           ("xcit_tiny_12_p16_224", {"cls_attn_layers": 1}, "class-attention")]


@pytest.mark.parametrize("name, extra, needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_attach_refuses_models_that_cannot_run_on_fewer_tokens(name, extra, needle):
    model = timm.create_model(name, pretrained=False, **TINY, **extra)
    with pytest.raises(ValueError, match=f"{type(model).__name__}: .*{needle}"):
        token_select.attach(model, token_select.TokenSelect())
    assert getattr(model, "_toe_hook", None) is None


def test_attach_refuses_blocks_that_need_the_grid_shape():
    class GridBlock(torch.nn.Module):
        def forward(self, x, height, width):
            return x

    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    model.blocks[1] = GridBlock()
    with pytest.raises(ValueError, match="GridBlock.forward takes height, width"):
        token_select.attach(model, token_select.TokenSelect())
    token_select.attach(model, token_select.TokenSelect(), block_index=1)  # nothing after the last block


@pytest.mark.parametrize("name, extra", [("vit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}),
                                         ("eva_giant_patch14_224", {}), ("lvvit_digits", {"stem_dim": 8})])
def test_attach_takes_models_with_absolute_positions(name, extra):
    model = timm.create_model(name, pretrained=False, **TINY, **extra)
    assert token_select.reduction_problem(model) is None
    token_select.attach(model, token_select.TokenSelect())


@pytest.mark.parametrize("block_index, error", [(-1, ValueError), (2, ValueError), (1.0, TypeError),
                                                (True, TypeError)])
def test_attach_refuses_a_block_index_that_is_not_a_block(block_index, error):
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    with pytest.raises(error, match="block_index"):
        token_select.attach(model, token_select.TokenSelect(), block_index=block_index)
    assert getattr(model, "_toe_hook", None) is None


def test_trainer_names_why_a_model_cannot_take_toe():
    task = _task()
    task.args.model = "cait_xxs24_224"
    with pytest.raises(UserError, match="cait_xxs24_224 .*class-attention"):
        task._check_model(timm.create_model("cait_xxs24_224", **TINY, depth_token_only=1))
