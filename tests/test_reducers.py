"""Tests of the baseline reducers (token_select.make_reducer: random, topk, tome) and ``--reducer``.

Each reducer is a TokenSelect subclass that replaces only the choice of tokens: through ``attach()``
it keeps ToE's count at every stage, passes the prefix (class, distillation) and suffix tokens
through, chooses other tokens than ToE, is the plain model in eval mode, and is reproducible under
the torch seed, compiles as one graph, and a tiny DeiT run with each ``--reducer`` resumed 2 + 2 epochs
equals 4 straight.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import token_select as T
from helpers import (FAST, INPUT, MODEL_KWARGS, PATCH, PLAIN, SCHEDULE, TINY, assert_same_tensors, deit_run, load,
                     read_log)

BASELINES = ["random", "topk", "tome"]
STEPS, RATES, R0 = [0, 2, 3], [0.25, 0.75, 1.0], 0.25   # stage 1 keeps a quarter: two ToMe rounds
SCHEDULE_KWARGS = dict(expansion_step=STEPS, keep_rate=RATES, initialization_keep_rate=R0)


def distilled_model(seed=0):
    """A 2-block distilled DeiT (class + distillation token) on 16 px images in 4 px patches: 16 patches."""
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=INPUT,
                             patch_size=PATCH, **MODEL_KWARGS)


def reducer(name, **extra):
    return T.make_reducer(name, **SCHEDULE_KWARGS, **extra)


@pytest.mark.parametrize("name", BASELINES)
def test_through_attach_each_reducer_keeps_toes_count_per_stage(name):
    model = distilled_model()
    op = T.attach(model, reducer(name))
    assert isinstance(op, T.TokenSelect) and op.reducer == name and model.token_select is op
    assert op.num_prefix_tokens == 2 and op.grid_size == (4, 4)
    patches = (INPUT // PATCH) ** 2
    expected = T.kept_tokens_per_stage(patches, RATES, R0)
    assert expected == [4, 12, 16]
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, INPUT, INPUT)
    model.train()
    for stage, kept in enumerate(expected, start=1):
        assert op.update_current_stage(STEPS[stage - 1]) == stage
        assert op.kept_patch_tokens(patches) == kept
        model(images)
        assert seen[-1] == 2 + kept, (stage, seen)
        if kept < patches:
            index = op.last_index
            assert op.reducing and index.shape == (3, 2 + kept)
            assert index[:, :2].tolist() == [[0, 1]] * 3                      # class and distillation tokens
            assert all(len(set(row[2:])) == kept and min(row[2:]) >= 2 for row in index.tolist())
        else:
            assert not op.reducing and op.last_index is None
    T.detach(model)
    assert not hasattr(model, "token_select")


@pytest.mark.parametrize("name", BASELINES)
def test_prefix_and_suffix_tokens_pass_through_and_each_output_is_a_mean_of_its_own_patches(name):
    """Every output patch token is the equal-weight mean of a set of input patches (one patch for the
    dropping reducers, ToMe's size-weighted mean for tome), the sets are disjoint, and the prefix and
    suffix tokens come out unchanged; read off the gradient of each output token."""
    torch.manual_seed(0)
    prefix, suffix, patches, kept = 2, 3, 16, 4
    op = reducer(name, num_prefix_tokens=prefix, num_suffix_tokens=suffix).train()
    op.update_current_stage(0)
    x = torch.randn(2, prefix + patches + suffix, 6, dtype=torch.float64, requires_grad=True)
    out, index = op(x)
    assert out.shape == (2, prefix + kept + suffix, 6)
    assert torch.equal(out[:, :prefix], x[:, :prefix]) and torch.equal(out[:, -suffix:], x[:, -suffix:])
    assert index[:, -suffix:].tolist() == [list(range(prefix + patches, prefix + patches + suffix))] * 2
    for b in range(2):
        covered = torch.zeros(patches, dtype=torch.bool)
        for slot in range(prefix, prefix + kept):
            (grad,) = torch.autograd.grad(out[b, slot, 0], x, retain_graph=True)
            weights = grad[b, prefix:prefix + patches, 0]
            members = weights.nonzero().flatten()
            assert grad[1 - b].abs().sum() == 0 and grad[b, :, 1:].abs().sum() == 0
            assert torch.allclose(weights[members], torch.full((len(members),), 1.0 / len(members),
                                                               dtype=torch.float64))
            assert int(index[b, slot]) - prefix in members.tolist()           # last_index: one of its patches
            assert not covered[members].any()
            covered[members] = True
        if name == "tome":
            assert covered.all()                                               # merged: nothing lost
        else:
            assert covered.sum() == kept                                       # dropped: the rest is gone


@pytest.mark.parametrize("name", BASELINES)
def test_each_reducer_chooses_other_tokens_than_toe(name):
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 16, 8)
    toe, other = reducer("toe").train(), reducer(name).train()
    for op in (toe, other):
        op.update_current_stage(0)
    (toe_out, toe_index), (out, index) = toe(x), other(x)
    assert out.shape == toe_out.shape
    assert not torch.equal(out, toe_out)
    if name != "tome":  # tome's survivors at a keep rate of 1/2 or less are a lattice; its groups differ
        assert any(set(a) != set(b) for a, b in zip(index.tolist(), toe_index.tolist()))


def test_topk_keeps_the_tokens_most_like_the_class_token():
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 16, 8)
    chosen = [3, 7, 8, 14]
    for i, position in enumerate(chosen):
        x[0, 1 + position] = x[0, 0] * (1.0 + i)            # parallel to the class token: cosine 1
    op = reducer("topk").train()
    op.update_current_stage(0)
    _, index = op(x)
    assert index[0, 1:].tolist() == [1 + p for p in chosen]
    no_prefix = reducer("topk", num_prefix_tokens=0).train()   # no class token: the mean patch token ranks
    no_prefix.update_current_stage(0)
    assert no_prefix(x[:, 1:])[0].shape == (1, 4, 8)


@pytest.mark.parametrize("name", BASELINES)
def test_eval_mode_is_the_plain_model_bit_for_bit(name):
    plain = distilled_model().eval()
    attached = copy.deepcopy(plain)
    op = T.attach(attached, reducer(name))
    op.update_current_stage(0)                               # a reducing stage, but eval mode
    attached.eval()
    images = torch.randn(2, 3, INPUT, INPUT)
    with torch.no_grad():
        assert torch.equal(attached(images), plain(images))
    assert op.last_index is None
    op.sparse_inference = True                               # reduces in eval only when asked
    with torch.no_grad():
        attached(images)
    assert op.last_index.shape == (2, 2 + 4)


@pytest.mark.parametrize("name", BASELINES)
def test_reproducible_under_the_torch_seed(name):
    x = torch.randn(4, 1 + 16, 8)
    x[1] = x[0]                                              # two identical images
    op = reducer(name).train()
    op.update_current_stage(0)

    def draw(seed):
        torch.manual_seed(seed)
        return [op(x)[1], op(x)[1]]                           # two steps

    first, again = draw(0), draw(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    if name == "random":  # fresh for every image and every step
        assert not torch.equal(first[0][0], first[0][1]) and not torch.equal(first[0], first[1])
        assert not torch.equal(draw(1)[0], first[0])
    else:                 # a function of the tokens
        assert torch.equal(first[0][0], first[0][1]) and torch.equal(first[0], first[1])


def test_make_reducer_names_and_toe_only_options():
    assert T.REDUCERS == ("toe", "random", "topk", "tome")
    assert type(T.make_reducer("toe", **SCHEDULE_KWARGS, merging="drop")) is T.TokenSelect
    op = T.make_reducer("tome", **SCHEDULE_KWARGS, initialization="uniform", distance="cosine", merging="mean")
    assert isinstance(op, T.ToMeReducer) and "reducer='tome'" in repr(op)
    with pytest.raises(ValueError, match="merging='drop' switches a part of ToE's operator"):
        T.make_reducer("random", **SCHEDULE_KWARGS, merging="drop")
    with pytest.raises(ValueError, match="reducer must be one of"):
        T.make_reducer("patchdrop")
    with pytest.raises(ValueError, match="keep_rate"):           # the schedule is checked as ToE's
        T.make_reducer("topk", expansion_step=[0], keep_rate=[1.5], initialization_keep_rate=0.25)


@pytest.mark.e2e  # torch.compile builds graphs for seconds
@pytest.mark.parametrize("name", BASELINES)
def test_each_reducer_compiles_with_fullgraph(name):
    op = reducer(name, num_prefix_tokens=2, num_suffix_tokens=1).train()
    op.update_current_stage(0)
    x = torch.randn(2, 2 + 16 + 1, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(0)  # random draws its tokens from the torch generator: the same draws in both
    expected, expected_index = op(x)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out, index = compiled(x)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


# -- the trainers' flag ---------------------------------------------------------------------------

def test_reducer_flag_builds_the_reducer_and_refuses_toe_switches(capsys):
    from ToE.common.args import TOE_KEYS, build_token_select
    from ToE.common.errors import UserError
    from ToE.deit.main import cli, parse_args

    assert "reducer" in TOE_KEYS                              # part of a run's identity (resume, --eval)
    assert type(build_token_select(parse_args([]))) is T.TokenSelect
    op = build_token_select(parse_args(["--reducer", "topk", "--initialization", "uniform"]))
    assert isinstance(op, T.TopKReducer) and op.keep_rate == [0.5, 0.75, 1.0]
    with pytest.raises(UserError, match="--merging drop switches a part of ToE's operator, which --reducer tome"):
        build_token_select(parse_args(["--reducer", "tome", "--merging", "drop"]))
    for argv, needle in ((["--reducer", "random", "--expansion", "random"], "--expansion random switches"),
                         (["--reducer", "topk", "--token-drop", "random"], "--reducer topk chooses the tokens")):
        with pytest.raises(SystemExit) as stop:
            cli([*argv, "--check-only"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.e2e  # trains a tiny model in this process (a few seconds per reducer)
@pytest.mark.parametrize("name", BASELINES)  # random also draws its tokens from the saved torch generator
def test_run_resumed_two_plus_two_epochs_equals_four_straight(name, data, tmp_path):
    common = ["--data-path", data, "--epochs", 4, *TINY, *FAST, *PLAIN, *SCHEDULE, "--reducer", name,
              "--no-model-ema"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    deit_run(*common, "--output_dir", straight).fit()
    deit_run(*common, "--output_dir", resumed, "--stop-after-epochs", 2).fit()
    assert load(resumed / "checkpoint.pth")["epoch"] == 1
    deit_run(*common, "--output_dir", resumed, "--auto-resume").fit()
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 3 and a["args"]["reducer"] == name
    assert_same_tensors(a["model"], b["model"], "model")
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key], f"optimizer state {key}")
    log_a, log_b = read_log(straight), read_log(resumed)
    assert [r["kept_tokens"] for r in log_a] == [8, 8, 12, 16]  # ToE's counts (helpers.SCHEDULE)
    assert len(log_a) == len(log_b) == 4
    for ra, rb in zip(log_a, log_b):
        for key in ("stage", "kept_tokens", "train_loss", "lr", "test_loss", "test_acc1"):
            assert ra[key] == rb[key], (ra["epoch"], key)
