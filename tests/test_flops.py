"""Fast tests of the FLOP calculator (ToE/flops.py)."""

import pytest

import token_select
from ToE import flops

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)  # 16 patches at 32 px / 8 px


@pytest.fixture(scope="module")
def tiny_model():
    return flops.create_model("vit_tiny_patch16_224", 32, 8, **TINY)


def test_counted_flops_match_the_formula(tiny_model):
    report = flops.schedule_report(tiny_model, 32, 30, [0, 10, 20], [0.5, 0.75, 1.0], 0.25, 2)
    kept = [row["kept_patches"] for row in report["stages"]]
    assert kept == token_select.kept_tokens_per_stage(16, [0.5, 0.75, 1.0], 0.25, 2) == [8, 12, 16]
    patches, width, patch_dim = 16, TINY["embed_dim"], 3 * 8 * 8
    for row in report["stages"]:
        # Exactly the formula, except: the image needs no gradient, so the patch embedding's
        # backward is 1x its forward (the formula's "3x forward" assumes 2x), and the counter
        # also sees the operator's (B, P, C) @ (B, C, P) similarity product when it reduces.
        patch_embed_backward = 2 * patches * patch_dim * width
        similarity = 2 * patches * patches * width if row["reducing"] else 0
        assert row["step_flops_counted"] == row["step_flops_analytic"] - patch_embed_backward + similarity
    run = report["run"]
    assert run["ideal_speedup_analytic"] == pytest.approx(run["ideal_speedup_token_select"], rel=1e-12)
    assert run["ideal_speedup_counted"] == pytest.approx(run["ideal_speedup_analytic"], rel=0.01)
    assert not hasattr(tiny_model, "token_select")  # the report detaches its operator again


def test_count_restores_fused_attention(tiny_model):
    flags = [blk.attn.fused_attn for blk in tiny_model.blocks]
    flops.count_step_flops(tiny_model, 32)
    assert [blk.attn.fused_attn for blk in tiny_model.blocks] == flags
    assert all(p.grad is None for p in tiny_model.parameters())


def test_stage_zero_row_when_the_schedule_starts_late(tiny_model):
    report = flops.schedule_report(tiny_model, 32, 10, [2, 5], [0.5, 1.0], 0.25, 1, count=False)
    assert [(r["stage"], r["epochs"]) for r in report["stages"]] == [(0, 2), (1, 3), (2, 5)]
    assert report["stages"][0]["kept_patches"] == 16 and not report["stages"][0]["reducing"]


def test_deit_small_default_is_about_1_31x(capsys):
    report = flops.main(["--analytic-only"])
    assert report["run"]["ideal_speedup_analytic"] == pytest.approx(1.31, abs=0.01)
    assert "ideal speedup 1.308x" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--keep-rate", "0.5", "0.4", "1.0"], ["--model", "no_such_model"],
                                  ["--bogus"], ["--epochs", "0"], ["--model-kwargs", "depth"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flops.main(argv + ["--analytic-only"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_model_kwargs_reach_the_model(capsys):
    report = flops.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=96", "depth=6",
                         "num_heads=3", "--input-size", "32", "--patch-size", "4", "--analytic-only"])
    assert report["shape"]["embed_dim"] == 96 and report["shape"]["depth"] == 6
    assert report["shape"]["num_patches"] == 64


def test_the_calculator_refuses_what_the_trainers_refuse_and_knows_lvvit(capsys):
    """A patch that does not tile the image was priced (a 16 px patch on an 8 px image); LV-ViT
    names were unknown to it."""
    from ToE.flops import create_model, schedule_report

    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        create_model("deit_tiny_patch16_224", 8)
    model = create_model("lvvit_digits", 16, 4, embed_dim=32, depth=2, num_heads=2, stem_dim=8)
    report = schedule_report(model, 16, 4, [0, 2, 3], [0.4, 0.7, 1.0], 0.2)
    kept = [row["kept_patches"] for row in report["stages"]]
    assert kept == [6, 10, 16] and report["run"]["ideal_speedup_counted"] > 1.0
