"""ToE in a plain PyTorch training loop: torchvision's VisionTransformer on scikit-learn's digits.

    python examples/plain_loop.py                # 6 epochs, seconds on 2 idle CPU cores
    python examples/plain_loop.py --model hf     # the same loop with a transformers ViTForImageClassification

The model is built from its constructor (no weights are downloaded), the data is
``sklearn.datasets.load_digits`` (1797 embedded 8x8 images, upscaled to 32 px). ToE takes two
lines: ``token_select.attach(model, ...)`` once, and ``toe.update_current_stage(epoch)`` before
every epoch. The schedule splits the epochs in thirds: the first keeps half the patch tokens, the
second three quarters, the last all of them. In ``model.eval()`` ToE is off and the model is the
plain full-token ViT. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's token_select

import token_select  # noqa: E402


def digits_split(seed: int = 0):
    """((train images, labels), (test images, labels)): 3 x 32 x 32 in [-1, 1], a fixed 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def build(kind: str) -> torch.nn.Module:
    """A ViT for 32 px images, 4 px patches (64 patch tokens + a class token), 10 classes."""
    if kind == "torchvision":
        from torchvision.models import VisionTransformer
        return VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10)
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=4, num_channels=3, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits   # transformers returns an output object


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["torchvision", "hf"], default="torchvision")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: a model this small gains nothing from more)")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (one per ToE stage)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build(args.model)
    toe = token_select.attach(model, token_select.TokenSelect(
        expansion_step=[0, args.epochs // 3, 2 * args.epochs // 3], keep_rate=[0.5, 0.75, 1.0],
        initialization_keep_rate=0.25, initialization="uniform"))
    seen: set = set()   # the tokens the second block sees: what ToE changes
    token_select.placement(model).blocks[1].register_forward_pre_hook(
        lambda module, inputs: seen.add(inputs[0].shape[1]) if module.training else None)

    (train_x, train_y), (test_x, test_y) = digits_split(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(train_y) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    tokens_per_epoch = []
    for epoch in range(args.epochs):
        stage = toe.update_current_stage(epoch)            # ToE: the stage of this epoch
        model.train()
        seen.clear()
        total = 0.0
        for batch in torch.randperm(len(train_y)).split(args.batch_size):
            loss = F.cross_entropy(logits_of(model(train_x[batch])), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        tokens_per_epoch.append(sorted(seen))
        print(f"epoch {epoch}: stage {stage}, block 1 saw {sorted(seen)} tokens, "
              f"train loss {total / len(train_y):.3f}")

    model.eval()   # ToE off: the full sequence
    with torch.no_grad():
        predictions = torch.cat([logits_of(model(x)).argmax(-1) for x in test_x.split(256)])
    accuracy = float((predictions == test_y).float().mean())
    print(f"test accuracy {accuracy:.4f}")
    summary = {"model": args.model, "tokens_per_epoch": tokens_per_epoch, "accuracy": accuracy}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
