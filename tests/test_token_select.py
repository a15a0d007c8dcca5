"""Tests of the ToE operator (token_select.py): parity with the published algorithm, options,
semantics, errors, arithmetic helpers, and attaching to unmodified timm models."""

import pytest
import torch

import token_select as T
from token_select import TokenSelect

DEIT = dict(expansion_step=[0, 100, 200], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25)
LVVIT = dict(expansion_step=[0, 100, 200], keep_rate=[0.4, 0.7, 1.0], initialization_keep_rate=0.2)
EFFTRAIN = dict(expansion_step=[0, 100, 200], keep_rate=[0.6, 0.8, 1.0], initialization_keep_rate=0.3)


# ---------------------------------------------------------------------------------------------
# An independent reference, written per sample with Python lists from TOE_ALGORITHM.md.
# ---------------------------------------------------------------------------------------------
def reference_token_select(x, keep_rate, initialization_keep_rate, repetitions, stage, prefix=1,
                           distance="cosine", rank="similarity", merging="mean"):
    out_rows, index_rows = [], []
    r0 = initialization_keep_rate
    num_stages = len(keep_rate)

    def score(a, b):  # higher = more alike
        if distance == "cosine":
            a = a / a.norm(dim=-1, keepdim=True)
            b = b / b.norm(dim=-1, keepdim=True)
            return a @ b.T
        distances = torch.cdist(a, b, p=1.0 if distance == "manhattan" else 2.0)
        return distances if rank == "published" else -distances  # published: the raw distance

    for sample in x:
        head, patches = sample[:prefix], sample[prefix:]
        P = patches.shape[0]
        n0 = int(P * r0)
        stride = int(1 // r0)
        selected = [i for i in range(P) if i % stride == 0][:n0]
        unselected = [i for i in range(P) if i not in selected]
        deltas, previous = [], r0
        for t in range(1, stage + 1):
            if t == num_stages:
                count = int(P * keep_rate[-1]) - int(P * (r0 + sum(deltas)))
            else:
                count = int(P * (keep_rate[t - 1] - previous))
            deltas.append(keep_rate[t - 1] - previous)
            previous = keep_rate[t - 1]
            for step in range(repetitions):
                share = count // repetitions
                m = share if step < repetitions - 1 else count - (repetitions - 1) * share
                best = score(patches[unselected], patches[selected]).max(dim=1).values
                order = sorted(range(len(unselected)), key=lambda j: best[j].item())  # stable, ascending
                moved = [unselected[j] for j in order]
                selected = selected + moved[:m]
                unselected = moved[m:]
        assignment = score(patches[unselected], patches[selected]).argmax(dim=1).tolist()
        merged = []
        for j, s in enumerate(selected):
            group = [patches[s]] + [patches[u] for u, a in zip(unselected, assignment) if a == j and merging == "mean"]
            merged.append(torch.stack(group).mean(dim=0))
        out_rows.append(torch.cat([head, torch.stack(merged)]))
        index_rows.append(list(range(prefix)) + [s + prefix for s in selected])
    return torch.stack(out_rows), torch.tensor(index_rows)


def merge_group_sizes(x, index, prefix=1):
    """(B, K) size of each kept token's merge group (itself + the tokens assigned to it by cosine),
    computed in float64 from x (B, N, C) and the operator's index (B, prefix + K)."""
    patches = torch.nn.functional.normalize(x[:, prefix:].detach().double(), dim=-1)
    kept_pos = index[:, prefix:] - prefix
    rows = []
    for b in range(x.shape[0]):
        unselected = sorted(set(range(patches.shape[1])) - set(kept_pos[b].tolist()))
        assign = (patches[b, unselected] @ patches[b, kept_pos[b]].T).argmax(dim=1)
        rows.append(1 + torch.bincount(assign, minlength=kept_pos.shape[1]))
    return torch.stack(rows)


def run_operator(x, config, stage, repetitions=2, **kwargs):
    op = TokenSelect(expansion_multiple_stage=repetitions, **config, **kwargs)
    op.train()
    op.current_stage = stage
    return op(x)


@pytest.mark.parametrize("config", [DEIT, LVVIT, EFFTRAIN], ids=["deit", "lvvit", "efficienttrain"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("repetitions", [1, 2, 5])
def test_parity_with_reference_float64(config, stage, repetitions):
    torch.manual_seed(stage * 10 + repetitions)
    x = torch.randn(3, 1 + 196, 16, dtype=torch.float64)
    out, index = run_operator(x, config, stage, repetitions)
    ref_out, ref_index = reference_token_select(x, config["keep_rate"], config["initialization_keep_rate"],
                                                repetitions, stage)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distance", ["manhattan", "euclidean"])
def test_parity_distances_mean_farthest_and_nearest(distance):
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 64, 8, dtype=torch.float64)
    out, index = run_operator(x, dict(expansion_step=[0, 5], keep_rate=[0.6, 1.0], initialization_keep_rate=0.4),
                              1, 2, distance=distance)
    ref_out, ref_index = reference_token_select(x, [0.6, 1.0], 0.4, 2, 1, distance=distance)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


def test_parity_final_stage_below_one_and_other_token_counts():
    # A last stage that stops short of 1.0 uses the final-stage correction, and stays active.
    config = dict(expansion_step=[0, 3], keep_rate=[0.4, 0.7], initialization_keep_rate=0.4)
    for num_patches in (100, 144, 50):
        torch.manual_seed(num_patches)
        x = torch.randn(2, 1 + num_patches, 12, dtype=torch.float64)
        out, index = run_operator(x, config, 2, 2)
        ref_out, ref_index = reference_token_select(x, config["keep_rate"], 0.4, 2, 2)
        assert torch.equal(index, ref_index)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


# -- the paper's ablations: each component replaced by its plain alternative ----------------------
ABLATION = dict(expansion_step=[0, 5, 10], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25)


def _kept(index, prefix=1):
    return [sorted((row[prefix:] - prefix).tolist()) for row in index]


@pytest.mark.parametrize("distance", ["manhattan", "euclidean"])
def test_ablation_published_distance_rank_is_the_published_codes_choice(distance):
    torch.manual_seed(1)
    x = torch.randn(2, 1 + 64, 8, dtype=torch.float64)
    out, index = run_operator(x, ABLATION, 1, 2, distance=distance, distance_rank="published")
    ref_out, ref_index = reference_token_select(x, [0.5, 0.75, 1.0], 0.25, 2, 1, distance=distance, rank="published")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    _, ours = run_operator(x, ABLATION, 1, 2, distance=distance)
    assert _kept(index) != _kept(ours)  # the switch changes what is kept
    # cosine is a similarity already: the switch changes nothing there
    cosine = run_operator(x, ABLATION, 1, 2, distance_rank="published")[1]
    assert torch.equal(cosine, run_operator(x, ABLATION, 1, 2)[1])


def test_ablation_merging_drop_keeps_the_same_tokens_unaveraged():
    torch.manual_seed(2)
    x = torch.randn(3, 1 + 64, 8, dtype=torch.float64, requires_grad=True)
    out, index = run_operator(x, ABLATION, 2, 2, merging="drop")
    merged_out, merged_index = run_operator(x, ABLATION, 2, 2)
    assert torch.equal(index, merged_index)  # the same selection
    torch.testing.assert_close(out, x.gather(1, index.unsqueeze(-1).expand(-1, -1, 8)), rtol=0, atol=0)
    assert not torch.allclose(out, merged_out)  # the merge averaged the kept tokens
    ref_out, ref_index = reference_token_select(x.detach(), [0.5, 0.75, 1.0], 0.25, 2, 2, merging="drop")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    out.sum().backward()  # dropped tokens get no gradient, kept ones exactly one
    grad = x.grad[:, 1:].abs().sum(-1)
    kept = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, index[:, 1:] - 1, True)
    assert torch.all(grad[~kept] == 0) and torch.all(grad[kept] > 0)


def test_ablation_random_initialization_draws_other_seeds_per_sample():
    torch.manual_seed(3)
    x = torch.randn(4, 1 + 64, 8)
    config = dict(ABLATION, initialization_keep_rate=0.25)
    torch.manual_seed(10)
    _, index = run_operator(x, config, 1, 2, initialization="random")
    torch.manual_seed(10)
    _, again = run_operator(x, config, 1, 2, initialization="random")
    _, stride = run_operator(x, config, 1, 2)
    assert torch.equal(index, again)  # torch's generator decides: reproducible under a seed
    seeds = [row[1:1 + 16].tolist() for row in index]  # the 16 seeds come first
    stride_seeds = stride[0, 1:1 + 16].tolist()
    assert all(len(set(row)) == 16 for row in seeds) and len({tuple(row) for row in seeds}) == 4
    assert all(row != stride_seeds for row in seeds) and index.shape == stride.shape


def test_ablation_random_expansion_keeps_the_seeds_and_adds_other_tokens():
    torch.manual_seed(4)
    x = torch.randn(4, 1 + 64, 8)
    _, index = run_operator(x, ABLATION, 1, 2, expansion="random")
    _, farthest = run_operator(x, ABLATION, 1, 2)
    assert index.shape == farthest.shape
    assert torch.equal(index[:, :17], farthest[:, :17])  # class token + the same 16 stride seeds
    assert _kept(index) != _kept(farthest)


@pytest.mark.parametrize("initialization", ["stride", "uniform"])
def test_ablation_no_expansion_places_every_kept_token_by_the_initialization_rule(initialization):
    torch.manual_seed(5)
    x = torch.randn(2, 1 + 64, 8)
    for stage, kept in ((1, 32), (2, 48)):
        _, index = run_operator(x, ABLATION, stage, 2, expansion="none", initialization=initialization)
        placed = T.seed_positions(64, kept / 64, initialization, count=kept)
        assert _kept(index) == [sorted(placed)] * 2 and len(placed) == kept
    _, ours = run_operator(x, ABLATION, 1, 2)
    _, none = run_operator(x, ABLATION, 1, 2, expansion="none")
    assert _kept(ours) != _kept(none) and _kept(none)[0] == list(range(0, 64, 2))  # stride 2 at rate 0.5


def test_expanded_tokens_are_the_least_similar():
    # Two clusters; seeds land in the first, so the first expansion must pick the other cluster.
    P = 16
    x = torch.zeros(1, 1 + P, 2, dtype=torch.float64)
    x[0, 1:, 0] = 1.0
    x[0, 1 + 9, :] = torch.tensor([0.0, 1.0])  # the odd one out, not a seed for stride 4
    out, index = run_operator(x, dict(expansion_step=[0], keep_rate=[0.3125], initialization_keep_rate=0.25),
                              1, 1)
    assert index[0, 1:5].tolist() == [1, 5, 9, 13]  # seeds 0, 4, 8, 12 (+1 for the class token)
    assert index[0, 5].item() == 1 + 9


# ---------------------------------------------------------------------------------------------
# Published counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_patches,config,expected", [
    (196, DEIT, [98, 147, 196]),
    (196, LVVIT, [78, 136, 196]),
    (196, EFFTRAIN, [116, 155, 196]),
    (100, EFFTRAIN, [60, 80, 100]),
    (144, EFFTRAIN, [86, 114, 144]),
])
def test_published_token_counts(num_patches, config, expected):
    assert T.kept_tokens_per_stage(num_patches, config["keep_rate"], config["initialization_keep_rate"]) == expected
    op = TokenSelect(**config).train()
    x = torch.randn(1, 1 + num_patches, 4)
    for stage, kept in enumerate(expected, start=1):
        op.current_stage = stage
        assert op(x)[0].shape[1] == 1 + kept
        assert op.kept_patch_tokens(num_patches) == kept


def test_stages_follow_epochs_and_off_stages_return_none():
    op = TokenSelect(expansion_step=[2, 4, 6], keep_rate=[0.5, 0.75, 1.0]).train()
    x = torch.randn(2, 1 + 16, 4)
    stages = [op.update_current_stage(epoch) for epoch in range(8)]
    assert stages == [0, 0, 1, 1, 2, 2, 3, 3]
    for epoch, kept in [(0, None), (2, 8), (4, 12), (6, None)]:
        op.update_current_stage(epoch)
        out, index = op(x)
        if kept is None:
            assert index is None and out is x
        else:
            assert out.shape == (2, 1 + kept, 4) and index.shape == (2, 1 + kept)


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------
def test_identity_in_eval_mode_unless_sparse_inference():
    op = TokenSelect(**DEIT)
    op.update_current_stage(0)
    x = torch.randn(2, 197, 8)
    op.eval()
    out, index = op(x)
    assert out is x and index is None and op.last_index is None
    op.sparse_inference = True
    out, index = op(x)
    assert out.shape[1] == 99 and index.shape == (2, 99)


@pytest.mark.parametrize("prefix,suffix", [(1, 0), (2, 0), (1, 5), (0, 0)])
def test_prefix_and_suffix_tokens_pass_untouched(prefix, suffix):
    op = TokenSelect(**DEIT, num_prefix_tokens=prefix, num_suffix_tokens=suffix).train()
    op.update_current_stage(0)
    torch.manual_seed(prefix * 10 + suffix)
    x = torch.randn(3, prefix + 196 + suffix, 8, dtype=torch.float64)
    out, index = op(x)
    assert out.shape[1] == prefix + 98 + suffix
    # the patch tokens are reduced as if the suffix were not there
    ref_out, ref_index = reference_token_select(x[:, :prefix + 196], DEIT["keep_rate"], 0.25, 2, 1, prefix=prefix)
    assert torch.equal(index[:, :prefix + 98], ref_index)
    torch.testing.assert_close(out[:, :prefix + 98], ref_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    if suffix:
        assert torch.equal(out[:, -suffix:], x[:, -suffix:])
        assert index[:, -suffix:].tolist() == [list(range(prefix + 196, prefix + 196 + suffix))] * 3
    assert index[:, :prefix].tolist() == [list(range(prefix))] * 3
    kept_positions = index[:, prefix:prefix + 98]
    assert ((kept_positions >= prefix) & (kept_positions < prefix + 196)).all()


def test_index_is_input_position_and_merge_is_group_mean():
    torch.manual_seed(1)
    op = TokenSelect(**LVVIT).train()
    op.update_current_stage(0)
    x = torch.randn(4, 197, 8, dtype=torch.float64)
    out, index = op(x)
    assert index.dtype == torch.int64 and index.shape == (4, 1 + 78)
    assert all(len(set(row.tolist())) == row.numel() for row in index)  # no position twice
    # Each output token is the mean of its own input token and the tokens merged into it, so the
    # sum of (output * group size) over the kept tokens is the sum of all patch tokens.
    patches = x[:, 1:]
    kept_pos = index[:, 1:] - 1
    all_sizes = merge_group_sizes(x, index).to(x.dtype)
    for b in range(4):
        sizes = all_sizes[b]
        torch.testing.assert_close((out[b, 1:] * sizes[:, None]).sum(0), patches[b].sum(0))
        lonely = (sizes == 1).nonzero().flatten()
        torch.testing.assert_close(out[b, 1 + lonely], patches[b, kept_pos[b, lonely]])


def test_gradient_equals_the_reference_gradient():
    # The reference builds each output token with stack + mean, so autograd through it gives the
    # gradient of the published merge independently of the operator's scatter-add.
    torch.manual_seed(3)
    x = torch.randn(2, 197, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 1 + 147, 8, dtype=torch.float64)
    out, _ = run_operator(x, DEIT, 2)  # stage 2, 147 kept
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    ref_out, _ = reference_token_select(x, DEIT["keep_rate"], 0.25, 2, 2)
    (ref_grad,) = torch.autograd.grad((ref_out * weights).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert (grad.abs().sum(-1) > 0).all()  # every token, merged or kept, gets a gradient


def test_any_token_count_changing_between_calls():
    op = TokenSelect(**DEIT, num_suffix_tokens=3).train()
    op.update_current_stage(0)
    for num_patches in (196, 40, 123, 7, 196):
        out, index = op(torch.randn(2, 1 + num_patches + 3, 4))
        kept = T.kept_tokens_per_stage(num_patches, DEIT["keep_rate"], 0.25)[0]
        assert out.shape[1] == 1 + kept + 3 and index.shape[1] == 1 + kept + 3


def test_zero_tokens_do_not_give_nan():
    op = TokenSelect(**DEIT).train()
    op.update_current_stage(0)
    x = torch.randn(1, 197, 8)
    x[:, 100:] = 0.0  # e.g. padding
    out, _ = op(x)
    assert torch.isfinite(out).all()


def test_uniform_seeds_cover_every_row_of_the_grid():
    for r0 in (0.2, 0.25, 0.3, 0.4):
        stride_rows = {p // 14 for p in T.seed_positions(196, r0, "stride")}
        uniform = T.seed_positions(196, r0, "uniform", (14, 14))
        assert len(uniform) == len(set(uniform)) == int(196 * r0)
        rows = {p // 14 for p in uniform}
        cols = {p % 14 for p in uniform}
        # every row and column of the grid is at most one row/column away from a seed
        assert all(min(abs(r - s) for s in rows) <= 1 for r in range(14)), (r0, sorted(rows))
        assert all(min(abs(c - s) for s in cols) <= 1 for c in range(14)), (r0, sorted(cols))
        if r0 in (0.2, 0.4):  # the published rule leaves the bottom rows without seeds
            assert max(stride_rows) <= 11
    # non-square grid (a detector's feature map)
    uniform = T.seed_positions(10 * 30, 0.25, "uniform", (10, 30))
    rows, cols = {p // 30 for p in uniform}, {p % 30 for p in uniform}
    assert min(rows) <= 1 and max(rows) >= 8 and min(cols) <= 1 and max(cols) >= 28


def test_uniform_initialization_in_forward():
    op = TokenSelect(**LVVIT, initialization="uniform", grid_size=(14, 14)).train()
    op.update_current_stage(0)
    out, index = op(torch.randn(2, 197, 8))
    assert out.shape[1] == 79
    seeds = T.seed_positions(196, 0.2, "uniform", (14, 14))
    assert index[0, 1:1 + len(seeds)].tolist() == [s + 1 for s in seeds]


# ---------------------------------------------------------------------------------------------
# Precision: the selection does not depend on the input dtype or the autocast precision
# ---------------------------------------------------------------------------------------------
DISTANCE_IDS = list(T.DISTANCES)


def near_parallel_tokens(batch=8, patches=196, channels=64, seed=0):
    """(batch, 1 + patches, channels) float32: one shared large component plus small noise, so
    every cosine lies within ~1e-3 of 1, where bf16 (spacing 2^-8 below 1) cannot order them."""
    generator = torch.Generator().manual_seed(seed)
    shared = 10.0 * torch.randn(1, 1, channels, generator=generator)
    return shared + 0.1 * torch.randn(batch, 1 + patches, channels, generator=generator)


@pytest.mark.parametrize("distance", DISTANCE_IDS)
def test_bf16_autocast_keeps_the_float32_selection(distance):
    """Under bf16 autocast the kept set and the output equal the fp32 ones (issue 12). Without the
    autocast-off float32 similarity the cosine index differs in all 8 samples; the distances use
    ``torch.cdist``, which autocast leaves alone, so for them this guards against a regression."""
    x = near_parallel_tokens()
    cos = torch.nn.functional.normalize(x[:, 1:], dim=-1)
    cos = cos @ cos.transpose(1, 2)
    # the construction is what makes the test bite: thousands of fp32 cosines, few bf16 values
    assert cos.min() > 0.99 and cos.bfloat16().unique().numel() < 10
    expected, expected_index = run_operator(x, DEIT, 1, distance=distance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, index = run_operator(x, DEIT, 1, distance=distance)
    assert torch.equal(index, expected_index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("distance", DISTANCE_IDS)
def test_half_precision_input_selects_like_its_float32_upcast(dtype, distance):
    """fp16/bf16 input: the same index as the fp32 copy of the same tokens, the output in the
    input dtype and equal to the fp32 output rounded to it (the merge is computed in fp32 and cast
    once). Before the fix cosine/euclidean chose other tokens and manhattan raised on the CPU."""
    x = near_parallel_tokens(seed=1).to(dtype)
    expected, expected_index = run_operator(x.float(), DEIT, 1, distance=distance)
    out, index = run_operator(x, DEIT, 1, distance=distance)
    assert torch.equal(index, expected_index)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)


def test_float16_large_tokens_merge_without_overflow():
    """fp16 tokens of ~3e4: three of them already sum past fp16's max (65504). The merge sums in
    fp32, so output and gradient equal the fp32 computation rounded to fp16 (issue 13)."""
    generator = torch.Generator().manual_seed(2)
    # four directions, so merge groups are large; all entries positive and ~3e4
    directions = 0.8 + 0.2 * torch.rand(4, 32, generator=generator)
    cluster = torch.randint(0, 4, (4, 197), generator=generator)
    x32 = 3e4 * directions[cluster] * (1 + 0.01 * torch.rand(4, 197, 32, generator=generator))
    x = x32.half().requires_grad_()
    upcast = x.detach().float().requires_grad_()
    weights = torch.randn(4, 1 + 78, 32, generator=generator)
    out, index = run_operator(x, LVVIT, 1)
    expected, expected_index = run_operator(upcast, LVVIT, 1)
    assert torch.equal(index, expected_index)
    # the case the test is about: some merge group sums past fp16's max, i.e. to inf in fp16
    sizes = merge_group_sizes(x32, index)
    assert sizes.max() >= 3 and 3 * x32[:, 1:].min() > torch.finfo(torch.float16).max
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.half(), rtol=0, atol=0)
    (grad,) = torch.autograd.grad((out * weights.half()).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights.half().float()).sum(), upcast)
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected_grad.half(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(expansion_step=[0, 100], keep_rate=[0.5, 0.75, 1.0]), "expansion_step has 2 entries"),
    (dict(keep_rate=[0.5, 0.75, 1.5]), "must lie in (0, 1]; got 1.5"),
    (dict(keep_rate=[0.0, 0.75, 1.0]), "must lie in (0, 1]; got 0.0"),
    (dict(keep_rate=[0.5, 0.4, 1.0]), "must not decrease (0.5 then 0.4)"),
    (dict(initialization_keep_rate=0.6), "initialization_keep_rate 0.6 must lie in (0, first keep rate 0.5]"),
    (dict(initialization_keep_rate=0.0), "initialization_keep_rate 0.0"),
    (dict(expansion_step=[0, 100, 100]), "strictly increasing (100 then 100)"),
    (dict(expansion_step=[-1, 100, 200]), "non-negative whole epochs; got -1"),
    (dict(expansion_multiple_stage=0), "integer >= 1; got 0"),
    (dict(distance="cosinus"), "distance must be one of"),
    (dict(initialization="spiral"), "initialization must be one of"),
    (dict(expansion="greedy"), "expansion must be one of"),
    (dict(merging="sum"), "merging must be one of"),
    (dict(distance_rank="raw"), "distance_rank must be one of"),
])
def test_bad_schedules_are_rejected_with_their_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        TokenSelect(**kwargs)
    assert message in str(error.value)


def test_forward_rejects_bad_shapes():
    op = TokenSelect(num_prefix_tokens=2).train()
    with pytest.raises(ValueError, match="batch, tokens, channels"):
        op(torch.randn(197, 8))
    with pytest.raises(ValueError, match="no patch tokens"):
        op(torch.randn(2, 2, 8))


# ---------------------------------------------------------------------------------------------
# Arithmetic helpers
# ---------------------------------------------------------------------------------------------
def test_flops_and_ideal_speedup():
    d, depth = 384, 12
    block = lambda n: 24 * n * d * d + 4 * n * n * d  # noqa: E731 - the algorithm page's formula
    assert T.vit_step_flops(196, d, depth, training=False) == pytest.approx(depth * block(197))
    assert T.vit_step_flops(196, d, depth, kept_patches=98) == pytest.approx(3 * (block(197) + 11 * block(99)))
    speedup = T.ideal_speedup(300, 196, d, depth, [0, 100, 200], [0.5, 0.75, 1.0], 0.25)
    assert 1.30 < speedup < 1.33  # the paper's ~1.3x for DeiT-S
    assert T.ideal_speedup(300, 196, d, depth, [0], [1.0], 0.25) == 1.0


def test_expansion_plan_split_over_repetition_steps():
    seeds, steps = T.expansion_plan(196, 2, [0.5, 0.75, 1.0], 0.25, 5)
    assert seeds == 49 and steps == [9, 9, 9, 9, 13, 9, 9, 9, 9, 13]


# ---------------------------------------------------------------------------------------------
# timm models
# ---------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm")

# The published models at 224 px take seconds each on a CPU: they run in the end-to-end tier (-m e2e).
FULL_SIZE = pytest.mark.e2e
TIMM_CASES = [
    pytest.param("deit_tiny_patch16_224", {}, 1, marks=FULL_SIZE, id="deit_tiny_patch16_224"),
    pytest.param("deit3_small_patch16_224", {}, 1, marks=FULL_SIZE, id="deit3_small_patch16_224"),
    pytest.param("deit_tiny_distilled_patch16_224", {}, 2, marks=FULL_SIZE, id="deit_tiny_distilled_patch16_224"),
    pytest.param("test_vit", {}, 1, id="test_vit"),
    pytest.param("vit_tiny_patch16_224", dict(embed_dim=96, depth=6, num_heads=3, img_size=32, patch_size=4), 1,
                 id="vit_tiny_patch16_224"),
]


def _image_size(model):
    return model.patch_embed.img_size


@pytest.mark.parametrize("name,kwargs,prefix", TIMM_CASES)
def test_timm_attach_parity(name, kwargs, prefix):
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, **kwargs)
    toe_model = timm.create_model(name, pretrained=False, **kwargs)
    toe_model.load_state_dict(plain.state_dict())
    op = T.attach(toe_model, TokenSelect(**DEIT))
    assert toe_model.token_select is op and op.num_prefix_tokens == prefix
    assert list(toe_model.state_dict()) == list(plain.state_dict())
    op.update_current_stage(0)
    images = torch.randn(2, 3, *_image_size(plain))

    # training: blocks 1.. see the reduced sequence; the weights get gradients
    seen = []
    toe_model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    toe_model.train()
    out = toe_model(images)
    loss = (out[0] if isinstance(out, tuple) else out).sum()
    loss.backward()
    num_patches = toe_model.patch_embed.num_patches
    assert seen == [prefix + T.kept_tokens_per_stage(num_patches, DEIT["keep_rate"], 0.25)[0]]
    assert op.last_index is not None and op.last_index.shape == (2, seen[0])
    assert toe_model.patch_embed.proj.weight.grad is not None

    # eval: bit-identical to the unattached model
    plain.eval(), toe_model.eval()
    with torch.no_grad():
        assert torch.equal(plain(images), toe_model(images))

    # the weights trained with ToE load strictly into a fresh timm model
    fresh = timm.create_model(name, pretrained=False, **kwargs)
    fresh.load_state_dict(toe_model.state_dict(), strict=True)


def test_attach_acts_under_gradient_checkpointing_and_detaches():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    op = T.attach(model, TokenSelect(**DEIT))
    op.update_current_stage(0)
    model.train()
    images = torch.randn(2, 3, *_image_size(model))
    expected = model(images)
    expected.sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    out = model(images)
    out.sum().backward()
    full = 1 + model.patch_embed.num_patches
    assert seen and all(n < full for n in seen)
    # the recomputed forward selects the same tokens, so the gradients are those without checkpoints
    torch.testing.assert_close(out, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)
    T.detach(model)
    seen.clear()
    model(images)
    assert seen and all(n == full for n in seen) and not hasattr(model, "token_select")


@pytest.mark.e2e  # torch.compile builds graphs for seconds
def test_attached_model_deepcopies_like_an_ema_copy_and_compiles():
    """A deepcopy (timm's ModelEma) carries its own operator; the attached model compiles through
    AOTAutograd (forward and backward graphs) and gives the eager output, index and gradients."""
    import copy
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    op = T.attach(model, TokenSelect(**DEIT))
    op.update_current_stage(0)
    ema = copy.deepcopy(model)  # what timm's ModelEma does
    assert ema.token_select is not op and ema.blocks[0]._toe_token_select is ema.token_select
    images = torch.randn(2, 3, *_image_size(model))
    ema.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(ema(images), model(images))
    # the copy's hook drives the copy's operator, not the original's
    ema.train()
    with torch.no_grad():
        ema(images)
    assert op.last_index is None and ema.token_select.last_index is not None

    model.train()
    expected = model(images)
    expected.sum().backward()
    expected_index = op.last_index
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    op.last_index = None  # so that the check below sees what the compiled call stored
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # the hook: no graph break
    out = compiled(images)
    assert out.grad_fn.name() == "CompiledFunctionBackward"  # AOTAutograd's compiled backward
    out.sum().backward()
    assert torch.equal(op.last_index, expected_index)
    assert torch.equal(op.last_index, ema.token_select.last_index)  # same weights, same selection
    torch.testing.assert_close(out, expected)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


@pytest.mark.e2e  # torch.compile builds graphs for seconds
def test_torch_compile_does_not_break():
    """The operator alone under AOTAutograd: forward and backward graphs, compared with eager."""
    torch.manual_seed(0)
    op = TokenSelect(**DEIT).train()
    op.update_current_stage(0)
    x = torch.randn(2, 1 + 64, 8, requires_grad=True)
    weights = torch.randn(2, 1 + 32, 8)
    expected, expected_index = op(x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    out, index = compiled(x)
    assert out.grad_fn.name() == "CompiledFunctionBackward"  # AOTAutograd's compiled backward
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_attention_mask_with_reduction_is_a_clear_error():
    model = timm.create_model("test_vit", pretrained=False)
    T.attach(model, TokenSelect(**DEIT)).update_current_stage(0)
    images = torch.randn(1, 3, *_image_size(model))
    tokens = 1 + model.patch_embed.num_patches
    mask = torch.zeros(1, 1, tokens, tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="attn_mask"):
        model.train().forward_features(images, attn_mask=mask)
    model.eval().forward_features(images, attn_mask=mask)  # ToE off: the mask is fine
