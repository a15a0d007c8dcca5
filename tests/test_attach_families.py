"""token_select.attach beyond timm: torchvision's VisionTransformer and the Hugging Face ViT family
(ViT, DeiT, Dinov2 with and without registers, CLIP vision), the transformers Trainer callback,
and the examples. Tiny models built from their configs (hidden 32, 2 layers, 32 px, 4 px
patches: 64 patch tokens); nothing is downloaded. The Hugging Face cases skip without
transformers (the ``hf`` extra); the torchvision ones run whenever torchvision is installed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import token_select as T
from token_select import TokenSelect

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=4)
NUM_PATCHES = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and not slowed down by other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def hf(model_name: str, config_name: str, **config):
    """A builder of the transformers model ``model_name`` from a tiny ``config_name``."""
    def build():
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**{**TINY, **config}))
    build.__name__ = model_name
    return build


def clip_for_image_classification():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        vision_config=TINY, num_labels=10,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    return transformers.CLIPForImageClassification(config)


# (builder, prefix tokens): class token, + distillation token (DeiT), + registers (Dinov2WithRegisters)
FAMILIES = [
    pytest.param(torchvision_vit, 1, id="torchvision-VisionTransformer"),
    pytest.param(hf("ViTModel", "ViTConfig"), 1, id="ViTModel"),
    pytest.param(hf("ViTForImageClassification", "ViTConfig", num_labels=10), 1, id="ViTForImageClassification"),
    pytest.param(hf("DeiTModel", "DeiTConfig"), 2, id="DeiTModel"),
    pytest.param(hf("DeiTForImageClassification", "DeiTConfig", num_labels=10), 2, id="DeiTForImageClassification"),
    pytest.param(hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=10), 2,
                 id="DeiTForImageClassificationWithTeacher"),
    pytest.param(hf("Dinov2Model", "Dinov2Config"), 1, id="Dinov2Model"),
    pytest.param(hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=10), 1,
                 id="Dinov2ForImageClassification"),
    pytest.param(hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=4), 5,
                 id="Dinov2WithRegistersModel-4-registers"),
    pytest.param(hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                    num_register_tokens=4, num_labels=10), 5, id="Dinov2WithRegistersForImageClassification"),
    pytest.param(hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=0), 1,
                 id="Dinov2WithRegistersModel-0-registers"),
    pytest.param(hf("CLIPVisionModel", "CLIPVisionConfig"), 1, id="CLIPVisionModel"),
    pytest.param(hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16), 1,
                 id="CLIPVisionModelWithProjection"),
    pytest.param(clip_for_image_classification, 1, id="CLIPForImageClassification"),
]


def tensors(output):
    """Every tensor of a model's output (a tensor, or a transformers ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [value for value in output.to_tuple() if isinstance(value, torch.Tensor)]


def record_length(block: nn.Module, seen: list):
    """A pre-hook that appends the sequence length a block receives."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1])
    return block.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("build,prefix", FAMILIES)
def test_attach_family(build, prefix):
    torch.manual_seed(0)
    plain, toe_model = build(), build()
    toe_model.load_state_dict(plain.state_dict())
    keys = list(plain.state_dict())
    op = T.attach(toe_model, TokenSelect(**SCHEDULE))

    # the model keeps its class and its state_dict keys; the operator knows the prefix and the grid
    assert type(toe_model) is type(plain) and toe_model.token_select is op
    assert list(toe_model.state_dict()) == keys
    assert op.num_prefix_tokens == prefix and op.grid_size == (8, 8)
    blocks = T.placement(toe_model).blocks
    assert len(blocks) == 2

    # training: block 1 sees the prefix and the kept patch tokens; last_index says where they came from
    op.update_current_stage(0)
    kept = op.kept_patch_tokens(NUM_PATCHES)
    assert kept == T.kept_tokens_per_stage(NUM_PATCHES, SCHEDULE["keep_rate"], 0.25)[0] == 32
    seen: list = []
    handle = record_length(blocks[1], seen)
    images = torch.randn(2, 3, 32, 32)
    toe_model.train()
    out = toe_model(images)
    tensors(out)[0].float().square().mean().backward()
    assert seen == [prefix + kept]
    assert op.last_index is not None and op.last_index.shape == (2, prefix + kept)
    assert torch.equal(op.last_index[:, :prefix], torch.arange(prefix).expand(2, -1))
    assert all(p.grad is not None for p in blocks[1].parameters())

    # eval: bit-identical to the unattached model, every output tensor
    plain.eval(), toe_model.eval()
    seen.clear()
    with torch.no_grad():
        expected, got = tensors(plain(images)), tensors(toe_model(images))
    assert seen == [prefix + NUM_PATCHES] and op.last_index is None
    assert len(expected) == len(got) and all(torch.equal(e, g) for e, g in zip(expected, got))

    # the weights trained with ToE load strictly into the plain model
    plain.load_state_dict(toe_model.state_dict(), strict=True)

    # detach: the plain model again
    T.detach(toe_model)
    assert not hasattr(toe_model, "token_select") and not hasattr(blocks[0], "_toe_token_select")
    assert list(toe_model.state_dict()) == keys
    seen.clear()
    toe_model.train()(images)
    assert seen == [prefix + NUM_PATCHES]
    handle.remove()


def test_uniform_seeds_use_each_familys_grid():
    """initialization="uniform" spreads the seeds over the model's (H, W) grid, not a guessed one."""
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(**{**TINY, "image_size": [32, 48]}))
    op = T.attach(model, TokenSelect(**SCHEDULE, initialization="uniform"))
    assert op.grid_size == (8, 12)
    op.update_current_stage(0)
    model.train()(torch.randn(1, 3, 32, 48))
    seeds = (op.last_index[0, 1:1 + 24] - 1).tolist()          # the 24 seeds of 96 patches
    assert seeds == T.seed_positions(96, 0.25, "uniform", (8, 12))
    # a 4 x 6 lattice over the 8 x 12 grid (a guessed 1 x 96 row would put them all in row 0)
    assert {s // 12 for s in seeds} == {1, 3, 5, 7} and {s % 12 for s in seeds} == {1, 3, 5, 7, 9, 11}


def test_gradient_checkpointing_and_deepcopy_of_a_transformers_model():
    """transformers' gradient checkpointing recomputes the same selection; a deepcopy (an EMA
    copy) carries its own operator."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=10))
    op = T.attach(model, TokenSelect(**SCHEDULE))
    op.update_current_stage(0)
    images = torch.randn(2, 3, 32, 32)
    model.train()
    expected = model(images).logits
    expected.sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # activation_checkpointing_enable from transformers 5.x, gradient_checkpointing_enable before
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen: list = []
    record_length(T.placement(model).blocks[1], seen)
    out = model(images).logits
    out.sum().backward()
    assert seen and all(n == 1 + 32 for n in seen)
    torch.testing.assert_close(out, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)

    ema = copy.deepcopy(model)
    assert ema.token_select is not op and T.placement(ema).blocks[0]._toe_token_select is ema.token_select
    op.last_index = None
    with torch.no_grad():
        ema.train()(images)
    assert op.last_index is None and ema.token_select.last_index is not None


def test_attention_mask_with_reduction_is_a_clear_error():
    transformers = pytest.importorskip("transformers")
    import inspect
    if "attention_mask" not in inspect.signature(transformers.ViTModel.forward).parameters:
        pytest.skip("this transformers version's ViTModel takes no attention_mask")
    model = transformers.ViTModel(transformers.ViTConfig(**TINY))
    T.attach(model, TokenSelect(**SCHEDULE)).update_current_stage(0)
    images = torch.randn(1, 3, 32, 32)
    mask = torch.ones(1, 1 + NUM_PATCHES, dtype=torch.long)
    mask[:, -4:] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model.train()(images, attention_mask=mask)
    assert model.eval()(images, attention_mask=mask).last_hidden_state.shape[1] == 1 + NUM_PATCHES


class TupleLayer(nn.Module):
    """A transformers 4.x-style layer: returns (hidden_states, attention weights), takes masks."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
        return self.proj(hidden_states), "weights"


class FourXViT(nn.Module):
    """A transformers 4.x ViT layout: model.encoder.layer, config.model_type == "vit"."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="vit", image_size=32, patch_size=4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([TupleLayer(), TupleLayer()])


def test_tuple_outputs_and_positional_masks_of_transformers_4_layers():
    model = FourXViT()
    op = T.attach(model, TokenSelect(**SCHEDULE))
    op.update_current_stage(0)
    layer = model.encoder.layer[0]
    x = torch.randn(2, 1 + NUM_PATCHES, 8)
    model.train()
    hidden, weights = layer(x)
    assert hidden.shape == (2, 1 + 32, 8) and weights == "weights"
    with pytest.raises(ValueError, match="causal_attention_mask"):
        layer(x, None, torch.zeros(2, 1, 65, 65))               # a mask given by position
    model.eval()
    hidden, weights = layer(x)
    assert hidden.shape == (2, 1 + NUM_PATCHES, 8) and weights == "weights"


def test_models_that_need_every_token_or_are_unknown_are_refused():
    with pytest.raises(ValueError, match="torchvision's VisionTransformer"):
        T.attach(nn.Linear(2, 2))
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="patch grid"):
        T.attach(transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**TINY, encoder_stride=4)))
    with pytest.raises(ValueError, match="patch grid"):
        T.attach(transformers.Dinov2Backbone(transformers.Dinov2Config(**TINY)))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="'bert'"):
        T.attach(bert)


def test_timm_models_still_take_the_timm_placement():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_vit", pretrained=False)
    where = T.placement(model)
    assert where.family == "timm" and where.blocks is model.blocks
    assert where.num_prefix_tokens == model.num_prefix_tokens and where.mask_args == ("attn_mask",)


# ---------------------------------------------------------------------------------------------
# The transformers Trainer callback
# ---------------------------------------------------------------------------------------------
def test_callback_sets_the_stage_from_the_trainers_epoch():
    transformers = pytest.importorskip("transformers")
    from ToE.integrations.hf import ToECallback
    model = transformers.ViTModel(transformers.ViTConfig(**TINY))
    op = T.attach(model, TokenSelect(expansion_step=[0, 2, 4], keep_rate=[0.5, 0.75, 1.0]))
    args, control = SimpleNamespace(), transformers.TrainerControl()
    state = transformers.TrainerState()

    callback = ToECallback(op)
    callback.on_train_begin(args, state, control, model=model)
    stages = []
    for epoch in [0.0, 1.0, 1.9999999, 3.0, 4.0]:   # the trainer's float epoch at each epoch start
        state.epoch = epoch if epoch else state.epoch
        callback.on_epoch_begin(args, state, control, model=model)
        stages.append((callback.epoch, op.current_stage))
    # 1.9999999: the float fell short of the third epoch; the callback's own count holds it at 2
    assert stages == [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3)]

    # resuming halfway through epoch 2, with the operator taken from the trainer's model
    resumed = ToECallback()
    state = transformers.TrainerState(epoch=2.5)
    op.update_current_stage(0)
    resumed.on_train_begin(args, state, control, model=model)
    resumed.on_epoch_begin(args, state, control, model=model)
    assert resumed.epoch == 2 and op.current_stage == 2 == resumed.stage

    with pytest.raises(ValueError, match="attach"):
        ToECallback().on_epoch_begin(args, state, control, model=nn.Linear(2, 2))


def test_callback_module_without_transformers_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)    # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "ToE.integrations.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        import ToE.integrations.hf  # noqa: F401
    monkeypatch.delitem(sys.modules, "ToE.integrations.hf", raising=False)


# ---------------------------------------------------------------------------------------------
# The examples (each starts a training run: end-to-end tier)
# ---------------------------------------------------------------------------------------------
def run_example(*argv) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_hf_trainer_example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    summary = run_example("examples/hf_trainer.py", "--epochs", "3")
    # one epoch per stage: half, three quarters, then all of the 64 patch tokens (plus the class token)
    assert summary["tokens_per_epoch"] == [[1 + 32], [1 + 48], [1 + 64]]
    assert summary["accuracy"] > 0.2   # 10 classes: above chance after 3 short epochs


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["torchvision", "hf"])
def test_plain_loop_example(model):
    if model == "hf":
        pytest.importorskip("transformers")
    summary = run_example("examples/plain_loop.py", "--model", model, "--epochs", "3")
    assert summary["tokens_per_epoch"] == [[1 + 32], [1 + 48], [1 + 64]]
    assert summary["accuracy"] > 0.2
