"""--finetune (DeiT's flag) and Visual Prompt Tuning (--vpt shallow|deep) with Token Expansion."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import FAST, PLAIN, TINY, load, ok, run_main
from timm.layers import resample_abs_pos_embed

import token_select
from ToE.common.errors import UserError
from ToE.common.pretrained import finetune
from ToE.common.vpt import add_prompts, freeze_backbone

KW = dict(embed_dim=32, depth=3, num_heads=2, patch_size=4)


def tiny(classes=10, img=32, **extra):
    return timm.create_model("vit_tiny_patch16_224", num_classes=classes, img_size=img, **KW, **extra)


def test_finetune_drops_a_head_of_another_class_count_and_resamples_the_position_table(tmp_path):
    torch.manual_seed(0)
    source = tiny(classes=10, img=32)  # 8 x 8 grid
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")  # this project's layout
    torch.manual_seed(1)
    target = tiny(classes=3, img=48)  # 12 x 12 grid, 3 classes
    head = target.head.weight.clone()
    notes = finetune(target, str(tmp_path / "checkpoint.pth"))
    assert any("head" in note for note in notes) and any("8 x 8 to a 12 x 12" in note for note in notes)
    assert torch.equal(target.head.weight, head)  # the new head keeps its initialisation, as DeiT does
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(12, 12), num_prefix_tokens=1)
    assert torch.equal(target.pos_embed.detach(), expected)
    assert torch.equal(target.pos_embed[:, :1], source.pos_embed[:, :1])  # the class row is kept
    for key, value in source.state_dict().items():
        if not key.startswith(("head.", "pos_embed")):
            assert torch.equal(target.state_dict()[key], value), key


def test_finetune_same_classes_keeps_the_head_and_a_plain_timm_state_dict_loads(tmp_path):
    source = tiny()
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    target = tiny()
    assert finetune(target, str(tmp_path / "timm.pth")) == []
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), (b"junk", "corrupt"),
                                             ({"weights": 1}, "no pos_embed")])
def test_finetune_bad_file_is_one_user_error(tmp_path, content, needle):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=needle):
        finetune(tiny(), str(path))
    other = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, embed_dim=48, depth=3,
                              num_heads=2, patch_size=4)
    torch.save(other.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="does not fit"):
        finetune(tiny(), str(tmp_path / "wide.pth"))


def _vpt_model(deep, tokens=5):
    torch.manual_seed(0)
    model = tiny(classes=4)
    add_prompts(model, tokens, deep=deep)
    freeze_backbone(model)
    toe = token_select.TokenSelect(expansion_step=[0], keep_rate=[0.5], initialization_keep_rate=0.25)
    token_select.attach(model, toe)
    toe.num_prefix_tokens += tokens  # as the trainer does: the prompts are prefix tokens
    toe.update_current_stage(0)
    return model, toe


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_trains_only_prompts_and_head(deep):
    model, _ = _vpt_model(deep)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"vpt.prompts", "head.weight", "head.bias"}
    assert model.vpt.prompts.shape == ((3 if deep else 1), 5, 32)


@pytest.mark.parametrize("deep", [False, True])
def test_toe_reduces_only_patch_tokens_and_passes_the_prompts_through(deep):
    model, toe = _vpt_model(deep)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda block, args: seen.append(args[0].detach().clone()))
    first = []
    model.blocks[0].register_forward_hook(lambda block, args, out: first.append(out.detach().clone()))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    kept = toe.kept_patch_tokens(64)
    assert kept == 32
    assert seen[0].shape[1] == 1 + 5 + kept  # class token + 5 prompts + the kept patches
    if not deep:  # the prompt outputs of block 0 pass the operator untouched
        assert torch.equal(seen[0][:, :6], first[0][:, :6])
    else:  # deep: block 1 gets its own prompts in place of block 0's outputs
        assert torch.equal(seen[0][:, 1:6], model.vpt.prompts[1].detach().expand(2, -1, -1))
    assert torch.equal(toe.last_index[:, :6], torch.arange(6).expand(2, -1))


def test_vpt_eval_is_the_full_sequence_with_prompts():
    model, toe = _vpt_model(True)
    model.eval()
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda block, args: seen.append(args[0].shape[1]))
    model(torch.randn(1, 3, 32, 32))
    assert seen == [1 + 5 + 64]


@pytest.mark.e2e
def test_finetune_onto_another_class_count_trains(data, pretrained, tmp_path):
    result = ok(run_main("--data-path", data, *TINY, *FAST, *PLAIN, "--epochs", 2, "--expansion-step", 0, 1,
                         "--keep-rate", 0.5, 1.0, "--finetune", pretrained, "--output_dir", tmp_path / "ft"))
    assert "has another class count" in result.stdout and "from a 2 x 2 to a 4 x 4 grid" in result.stdout
    state = load(tmp_path / "ft" / "checkpoint.pth")
    assert state["model"]["head.weight"].shape == (3, 32) and state["epoch"] == 1


@pytest.mark.e2e
def test_vpt_checkpoint_is_small_resumes_exactly_and_refuses_another_backbone(data, pretrained, tmp_path):
    flags = ["--data-path", data, *TINY, *FAST, *PLAIN, "--expansion-step", 0, 1, 2, "--keep-rate", 0.5, 0.75,
             1.0, "--finetune", pretrained, "--vpt", "deep", "--prompt-tokens", 3]
    ok(run_main(*flags, "--epochs", 4, "--output_dir", tmp_path / "straight"))
    ok(run_main(*flags, "--epochs", 4, "--stop-after-epochs", 2, "--output_dir", tmp_path / "split"))
    ok(run_main(*flags, "--epochs", 4, "--auto-resume", "--output_dir", tmp_path / "split"))
    a, b = load(tmp_path / "straight" / "checkpoint.pth"), load(tmp_path / "split" / "checkpoint.pth")
    assert set(a["model"]) == {"vpt.prompts", "head.weight", "head.bias"}  # the backbone is not stored
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    evaluated = ok(run_main(*flags, "--eval", "--resume", tmp_path / "straight" / "checkpoint.pth"))
    assert "Accuracy on 7 test images" in evaluated.stdout
    other = tmp_path / "other.pth"
    weights = torch.load(pretrained, weights_only=True)["model"]
    torch.save({key: value + 1 if key == "blocks.0.mlp.fc1.weight" else value for key, value in weights.items()},
               other)
    refused = run_main(*[str(f) if f != pretrained else str(other) for f in flags], "--eval", "--resume",
                       tmp_path / "straight" / "checkpoint.pth")
    assert refused.returncode == 2 and "other frozen weights" in refused.stderr


def test_vpt_needs_finetune(data, capsys):
    from ToE.deit.main import cli

    with pytest.raises(SystemExit):
        cli(["--data-path", str(data), "--vpt", "shallow", "--check-only"])
    assert "--finetune" in capsys.readouterr().err


def test_shifted_digits_are_the_plain_digits_turned_inverted_and_tinted(tmp_path):
    import numpy as np
    from PIL import Image

    from ToE.common.digits import build_digits

    plain, shifted = build_digits(str(tmp_path / "plain"), 8), build_digits(str(tmp_path / "shift"), 8, shift=True)
    name = sorted((tmp_path / "plain" / "val" / "3").iterdir())[0].name
    a = np.asarray(Image.open(tmp_path / "plain" / "val" / "3" / name)).astype(int)
    b = np.asarray(Image.open(tmp_path / "shift" / "val" / "3" / name)).astype(int)
    assert plain != shifted
    assert np.array_equal(b[..., 2], np.rot90(255 - a[..., 2]))  # blue keeps the inverted, turned digit
    assert np.abs(b[..., 0] - np.round(b[..., 2] * 0.6)).max() <= 1  # red (and green) at 60 %


@pytest.mark.e2e
def test_speed_bench_measures_vpt_with_the_prompts_as_prefix_tokens(tmp_path):
    from bench import speed

    results = speed.main(["--quick", "--vpt", "deep", "--prompt-tokens", "3", "--out", str(tmp_path)])
    rows = {row["config"]: row for row in results["models"][0]["rows"]}
    assert results["schedule"]["vpt"] == "deep" and results["schedule"]["prompt_tokens"] == 3
    assert rows["full"]["tokens_after_block0"] == 1 + 3 + 64  # class token, prompts, patches
    assert rows["stage1"]["tokens_after_block0"] == 1 + 3 + 32
    assert "Visual Prompt Tuning, deep, 3 prompt tokens" in (tmp_path / "speed_quick.md").read_text()
