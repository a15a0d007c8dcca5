"""ToE with the Hugging Face Trainer: a tiny ViTForImageClassification on scikit-learn's digits.

    pip install -e ".[hf]"
    python examples/hf_trainer.py                # 6 epochs, seconds on 2 idle CPU cores

Everything is built here: the model from a ``ViTConfig`` (no download, no ``from_pretrained``),
the data from ``sklearn.datasets.load_digits`` (1797 embedded 8x8 images, upscaled to 32 px).
ToE takes two lines: ``token_select.attach`` puts the operator after the first ViT layer, and
``ToECallback`` sets its stage at the start of every epoch. The schedule splits the epochs in
thirds: the first keeps half the patch tokens, the second three quarters, the last all of them.
The last line printed is a JSON summary (the tokens layer 1 saw in each epoch, the test accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's token_select and ToE

import token_select  # noqa: E402
from ToE.integrations.hf import ToECallback  # noqa: E402


class Digits(torch.utils.data.Dataset):
    """scikit-learn's digits as 3 x 32 x 32 images in [-1, 1], in the Trainer's dict format."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
        self.images = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def digits_split(seed: int = 0):
    """(train, test): a fixed 80/20 split of the 1797 digits."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    cut = int(0.8 * len(order))
    return (Digits(data.data[order[:cut]], data.target[order[:cut]]),
            Digits(data.data[order[cut:]], data.target[order[cut:]]))


class SequenceLength(TrainerCallback):
    """Records the tokens the second ViT layer saw in each epoch (what ToE changes)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.lengths: list = []
        self.current: set = set()
        layer.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        if module.training:
            self.current.add(args[0].shape[1])

    def on_epoch_end(self, args, state, control, **kwargs):
        self.lengths.append(sorted(self.current))
        self.current = set()
        return control


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: a model this small gains nothing from more)")
    parser.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (one per ToE stage)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=4, num_channels=3, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config)

    # ToE: the operator after layer 0, and the callback that moves it from stage to stage
    toe = token_select.attach(model, token_select.TokenSelect(
        expansion_step=[0, args.epochs // 3, 2 * args.epochs // 3], keep_rate=[0.5, 0.75, 1.0],
        initialization_keep_rate=0.25, initialization="uniform"))
    lengths = SequenceLength(token_select.placement(model).blocks[1])

    train, test = digits_split(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch, num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256,
            learning_rate=args.lr, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=5,
            logging_strategy="epoch", eval_strategy="no", save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                          compute_metrics=accuracy, callbacks=[ToECallback(toe), lengths])
        trainer.train()
        metrics = trainer.evaluate()

    num_patches = (config.image_size // config.patch_size) ** 2
    for epoch, seen in enumerate(lengths.lengths):
        stage = token_select.stage_of_epoch(epoch, toe.expansion_step)
        print(f"epoch {epoch}: stage {stage}, layer 1 saw {seen} tokens of {1 + num_patches}")
    summary = {"tokens_per_epoch": lengths.lengths, "accuracy": metrics["eval_accuracy"],
               "eval_tokens": 1 + num_patches}
    print(f"test accuracy {metrics['eval_accuracy']:.4f} (ToE is off in evaluation: the full {1 + num_patches} tokens)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
