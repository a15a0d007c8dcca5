"""The project's figures, drawn into ``Figs/``.

    python -m bench.figures                 # all three
    python -m bench.figures pipeline        # Figs/toe_pipeline.png: ToE on a real photo
    python -m bench.figures speed           # Figs/speedup.png from bench/results/speed.json
    python -m bench.figures accuracy        # Figs/accuracy_time.png from bench/results/accuracy.json

The pipeline figure runs ``token_select.TokenSelect`` itself on scikit-learn's sample photo
``china.jpg`` (centre crop, 224 px, 16 px patches, 14 x 14 grid). The token features are the
raw patch pixels, ImageNet-normalised (768 values per patch), so the picture shows what the
operator does with the image content rather than with a randomly initialised network's
features. Which input patches were merged into each kept token is read off the operator's
autograd graph (the gradient of a kept token reaches exactly its merge group), so the figure
shows the operator's own output, not a re-implementation of it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import token_select
from bench.common import paired_ratios

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGS = os.path.join(ROOT, "Figs")
RESULTS = os.path.join(ROOT, "bench", "results")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

__all__ = ["photo_patches", "run_operator", "merge_groups", "draw_pipeline", "draw_speed", "draw_accuracy", "main"]


def photo_patches(size: int = 224, patch: int = 16, name: str = "china.jpg"):
    """(image (size, size, 3) in [0, 1], patch features (P, 3 * patch^2) ImageNet-normalised)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image(name)                       # (H, W, 3) uint8, shipped with scikit-learn
    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    image = np.asarray(crop, dtype=np.float64) / 255.0     # (size, size, 3)
    grid = size // patch
    normalised = (image - IMAGENET_MEAN) / IMAGENET_STD
    # (grid, patch, grid, patch, 3) -> (grid * grid, patch * patch * 3), raster order like timm's PatchEmbed
    features = normalised.reshape(grid, patch, grid, patch, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    return image, features


def run_operator(features: np.ndarray, stage: int, grid: int, **toe_kwargs):
    """Run TokenSelect (no prefix token) on one image's patch features in ``stage``.

    Returns (selected positions in selection order, list of the positions added by each step,
    seeds first, and the merge group of every selected token as a list of positions).
    """
    operator = token_select.TokenSelect(num_prefix_tokens=0, grid_size=(grid, grid), **toe_kwargs).train()
    operator.current_stage = stage
    tokens = torch.tensor(features, dtype=torch.float64).unsqueeze(0).requires_grad_(True)   # (1, P, C)
    out, index = operator(tokens)
    selected = index[0].tolist()
    seeds, steps = token_select.expansion_plan(features.shape[0], stage, operator.keep_rate,
                                               operator.initialization_keep_rate,
                                               operator.expansion_multiple_stage)
    parts, start = [], 0
    for count in [seeds] + steps:
        parts.append(selected[start:start + count])
        start += count
    return selected, parts, merge_groups(tokens, out)


def merge_groups(tokens: torch.Tensor, out: torch.Tensor) -> List[List[int]]:
    """Input positions feeding each output token: the rows where its gradient is non-zero."""
    groups = []
    for j in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[0, j].sum(), tokens, retain_graph=True)
        groups.append(torch.nonzero(grad[0].abs().sum(-1) > 0).flatten().tolist())
    return groups


def _grid_overlay(ax, size: int, patch: int) -> None:
    for edge in range(0, size + 1, patch):
        ax.axhline(edge - 0.5, color="white", lw=0.3, alpha=0.5)
        ax.axvline(edge - 0.5, color="white", lw=0.3, alpha=0.5)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (figures are drawn without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _load_results(path: Optional[str], name: str) -> Dict[str, object]:
    with open(path or os.path.join(RESULTS, name)) as handle:
        return json.load(handle)


def _save(fig, path: str, dpi: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _shrink_png(path: str, colours: int = 256) -> None:
    """Re-save a photo-heavy PNG with an adaptive palette: a quarter of the bytes, same look."""
    from PIL import Image

    with Image.open(path) as image:
        quantised = image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    quantised.save(path, optimize=True)


def draw_pipeline(path: Optional[str] = None, size: int = 224, patch: int = 16) -> str:
    """Figs/toe_pipeline.png: seeds, expansion steps, merge groups and the merged image per stage."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    path = path or os.path.join(FIGS, "toe_pipeline.png")
    image, features = photo_patches(size, patch)
    grid = size // patch
    schedule = dict(expansion_step=[0, 100, 200], keep_rate=[0.5, 0.75, 1.0], initialization_keep_rate=0.25,
                    expansion_multiple_stage=2)
    rows = [("stage 1: 98 of 196 kept, stride seeds", 1, "stride"),
            ("stage 2: 147 of 196 kept, stride seeds", 2, "stride"),
            ("stage 1: 98 of 196 kept, uniform seeds", 1, "uniform")]
    step_colours = ["#ffffff", "#ffd400", "#ff7f00", "#00d0ff", "#0050ff"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(15, 4.9 * len(rows)), layout="constrained")
    rng = np.random.default_rng(0)
    for r, (title, stage, initialization) in enumerate(rows):
        selected, parts, groups = run_operator(features, stage, grid, initialization=initialization, **schedule)
        # (a) the photo with the seeds
        ax = axes[r, 0]
        ax.imshow(image)
        _grid_overlay(ax, size, patch)
        for pos in parts[0]:
            y, x = divmod(pos, grid)
            ax.add_patch(Rectangle((x * patch - 0.5, y * patch - 0.5), patch, patch, fill=False,
                                   edgecolor="white", lw=1.5))
        ax.set_title(f"{len(parts[0])} seed tokens ({initialization} rule)", fontsize=10)
        ax.set_ylabel(title, fontsize=11, fontweight="bold")
        # (b) when each kept token was selected
        ax = axes[r, 1]
        ax.imshow(image * 0.35)
        for step, positions in enumerate(parts):
            for pos in positions:
                y, x = divmod(pos, grid)
                ax.add_patch(Rectangle((x * patch + 1, y * patch + 1), patch - 3, patch - 3, fill=False,
                                       edgecolor=step_colours[step % len(step_colours)], lw=2))
        labels = ["seeds"] + [f"step {i} (+{len(p)})" for i, p in enumerate(parts[1:], 1)]
        handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=step_colours[i % len(step_colours)], lw=2)
                   for i in range(len(parts))]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(parts), fontsize=7,
                  facecolor="#444444", labelcolor="white", handlelength=1.2, columnspacing=0.8)
        ax.set_title("expansion: tokens added per repetition step\n(least like anything kept; dimmed = merged away)",
                     fontsize=10)
        # (c) merge groups, one colour per kept token
        ax = axes[r, 2]
        palette = rng.uniform(0.15, 1.0, size=(len(groups), 3))
        group_map = np.zeros((grid, grid, 3))
        for g, members in enumerate(groups):
            for pos in members:
                group_map[pos // grid, pos % grid] = palette[g]
        ax.imshow(np.kron(group_map, np.ones((patch, patch, 1))) * 0.75 + image * 0.25)
        for pos in selected:
            y, x = divmod(pos, grid)
            ax.plot(x * patch + patch / 2, y * patch + patch / 2, "k.", ms=3)
        sizes = [len(m) for m in groups]
        ax.set_title(f"merge groups (colour per kept token, dot = kept)\n{sum(s > 1 for s in sizes)} tokens "
                     f"absorb others, largest group {max(sizes)}", fontsize=10)
        # (d) what blocks 1.. see: every patch shown as the mean of its group (pixel space)
        ax = axes[r, 3]
        merged = np.zeros_like(image)
        for members in groups:
            cells = [image[(p // grid) * patch:(p // grid + 1) * patch, (p % grid) * patch:(p % grid + 1) * patch]
                     for p in members]
            mean = np.mean(cells, axis=0)
            for p in members:
                merged[(p // grid) * patch:(p // grid + 1) * patch, (p % grid) * patch:(p % grid + 1) * patch] = mean
        ax.imshow(merged)
        ax.set_title(f"merged tokens, painted back on their groups\n({len(selected)} tokens go on to block 1)",
                     fontsize=10)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Token Expansion on a real photo: scikit-learn china.jpg, 224 px, 16 px patches, DeiT schedule "
                 "0.5 / 0.75 / 1.0, r0 = 0.25, 2 repetition steps per stage.\nToken features: the ImageNet-normalised "
                 "raw pixels of each patch (768 values), cosine distance; "
                 "the operator is token_select.TokenSelect itself.",
                 fontsize=11)
    _shrink_png(_save(fig, path, dpi=72))
    plt.close(fig)
    return path


def draw_speed(results_path: Optional[str] = None, path: Optional[str] = None) -> str:
    """Figs/speedup.png: measured vs FLOP-ideal step speedup per model and stage, with the A/A noise."""
    plt = _pyplot()
    results = _load_results(results_path, "speed.json")
    path = path or os.path.join(FIGS, "speedup.png")
    labels, measured, ideal, spread = [], [], [], []
    for model in results["models"]:
        full = next(r for r in model["rows"] if r["config"] == "full")
        for row in model["rows"]:
            if row["config"] == "full":
                continue
            labels.append(f"{model['model']}\nstage {row['stage']}\n{row['tokens_after_block0']} tokens")
            measured.append(row["measured_speedup"])
            ideal.append(row["ideal_speedup"])
            rounds = paired_ratios(full["step_times_s"], row["step_times_s"])
            spread.append((row["measured_speedup"] - min(rounds), max(rounds) - row["measured_speedup"]))
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.4))
    ax.bar(x - 0.2, ideal, 0.4, label="FLOP-ideal", color="#9ecae1")
    bars = ax.bar(x + 0.2, measured, 0.4, yerr=np.array(spread).T, capsize=3, color="#08519c",
                  label="measured (median of per-round paired ratios; whiskers: range over rounds)")
    for bar, m, i, (_, above) in zip(bars, measured, ideal, spread):
        ax.text(bar.get_x() + bar.get_width() / 2, m + above + 0.03, f"{m / i:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("training-step speedup over full tokens")
    machine = results["machine"]
    noise = ", ".join(f"{m['model']} ±{m['aa_control']['max_deviation']:.3f}" for m in results["models"])
    ax.set_title(f"ToE training step (fwd + bwd + AdamW), measured vs FLOP-ideal; number = ratio\n"
                 f"A/A noise (ToE-off stage vs full, largest per-round deviation): {noise}\n"
                 f"{machine['cpu_model']}, {machine['torch_threads']} threads, torch {machine['torch']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=90)
    plt.close(fig)
    return path


def draw_accuracy(results_path: Optional[str] = None, path: Optional[str] = None) -> str:
    """Figs/accuracy_time.png: mean top-1 against mean training time (error bars: std over seeds).

    Each epoch's time counts at its stage's median epoch time (``bench.common.robust_seconds``);
    the speedup in the legend is the mean of the per-seed paired ratios of the table.
    """
    plt = _pyplot()
    results = _load_results(results_path, "accuracy.json")
    path = path or os.path.join(FIGS, "accuracy_time.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for summary in results["summary"]:
        name = summary["config"]
        ax.errorbar(summary["robust_time_mean"], summary["acc1_mean"], xerr=summary["robust_time_std"],
                    yerr=summary["acc1_std"], fmt="s" if name == "full" else "o", capsize=3, ms=7,
                    label=summary["label"] if name == "full" else
                    f"{summary['label']} ({summary['robust_speedup']:.2f}x paired)")
    ax.set_xlabel("training time (s; each epoch at its stage's median epoch time), mean ± std over seeds")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"Demo ViT on embedded digits, {results['epochs']} epochs, seeds {results['seeds']} "
                 f"(n per config in the table)\n"
                 f"{results['machine']['cpu_model']}, {results['machine']['torch_threads']} threads", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="*", default=["pipeline", "speed", "accuracy"],
                        choices=["pipeline", "speed", "accuracy"], help="which figures to draw (default: all)")
    args = parser.parse_args(argv)
    drawers: Dict[str, callable] = {"pipeline": draw_pipeline, "speed": draw_speed, "accuracy": draw_accuracy}
    written = []
    for name in args.figures:
        written.append(drawers[name]())
        print(written[-1])
    return written


if __name__ == "__main__":
    main()
