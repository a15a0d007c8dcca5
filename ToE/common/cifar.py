"""CIFAR-10/100 from the user's own download as an ImageNet-layout folder, for fine-tuning.

    python -m ToE.common.cifar --source ~/Downloads/cifar-10-batches-py --out data/cifar10
    python -m ToE.common.cifar --source ~/Downloads/cifar-100-python --out data/cifar100

reads the "python version" of CIFAR-10 or CIFAR-100 (the pickled batches of the CIFAR website:
``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
``cifar-100-python/{train,test,meta}``) and writes ``train/<class>/*.png`` (the 50,000 training
images) and ``val/<class>/*.png`` (the 10,000 test images), 32 x 32 RGB, so the trainers read them
with the folder-loading code they use for ImageNet. Class folders are ``<label>_<name>`` with the
label zero-padded (``0_airplane`` .. ``9_truck``; ``00_apple`` .. ``99_worm`` with CIFAR-100's fine
labels), so the folder order is CIFAR's label order. ``--dataset`` is found from the files when
not given.

Nothing is downloaded. The batches are read with an unpickler that builds only what the CIFAR
files hold (dicts, lists, byte strings, numbers and numpy arrays), never an arbitrary object.
Writing goes through ``ToE.common.digits.build_folder``: into a temporary sibling folder renamed
at the end (an interrupted conversion leaves nothing half-written), a finished conversion of the
same data set is left alone, and any other folder at ``--out`` is refused untouched.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from typing import Dict, List, Optional, Tuple

import numpy as np

from .digits import build_folder
from .errors import UserError, run_main

# data set -> (its folder name on the CIFAR website, training files, test file, meta file, label key, names key)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
DOWNLOAD = {"cifar10": "the CIFAR-10 python version", "cifar100": "the CIFAR-100 python version"}
VERSION = "1"  # of the written layout; a build stamped with another version is replaced


class _CifarUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and dtypes besides the plain containers (what a CIFAR batch holds)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how a protocol-2 pickle written by Python 3 stores bytes

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def _read_batch(path: str) -> Dict[str, object]:
    """The mapping in one pickled CIFAR file, keys as text (the files were written by Python 2: its
    strings are read as latin-1, as torchvision reads them, which numpy's arrays need)."""
    try:
        with open(path, "rb") as handle:
            data = _CifarUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the CIFAR folder is incomplete. Unpack the whole archive again") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a CIFAR python batch ({error.__class__.__name__}: {error}). Pass the folder "
                        "of the python version (not the binary or MATLAB one), unpacked from its .tar.gz") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR python batch (it holds a {type(data).__name__}). Pass the folder "
                        "of the python version")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in data.items()}


def find_dataset(source: str) -> Tuple[str, str]:
    """(dataset, folder) for ``--source``: the batch folder itself, or a folder holding it."""
    if not os.path.isdir(source):
        if os.path.isfile(source) and source.endswith((".tar.gz", ".tgz")):
            raise UserError(f"--source {source} is the archive: unpack it first (tar xzf {source}) and pass the "
                            "folder it makes (cifar-10-batches-py or cifar-100-python)")
        raise UserError(f"--source {source} does not exist. Download {DOWNLOAD['cifar10']} or "
                        f"{DOWNLOAD['cifar100']} from the CIFAR website (Alex Krizhevsky's page at the University "
                        "of Toronto), unpack it, and pass the folder it makes")
    for dataset, (folder, train, _, meta, _, _) in LAYOUTS.items():
        for candidate in (source, os.path.join(source, folder)):
            if os.path.isfile(os.path.join(candidate, meta)) and os.path.isfile(os.path.join(candidate, train[0])):
                return dataset, candidate
    raise UserError(f"--source {source} holds neither CIFAR-10's python batches (data_batch_1..5, test_batch, "
                    "batches.meta) nor CIFAR-100's (train, test, meta). Download the python version from the CIFAR "
                    "website, unpack it, and pass the folder it makes (cifar-10-batches-py or cifar-100-python)")


def _split(folder: str, files: List[str], label_key: str) -> Tuple[np.ndarray, List[int]]:
    """Images (N, 32, 32, 3) uint8 and labels of the batch files ``files`` in ``folder``."""
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        batch = _read_batch(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            label = [int(value) for value in batch[label_key]]
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path} lacks the CIFAR fields data and {label_key} ({error}). Pass the folder of the "
                            "python version, unpacked from its .tar.gz") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(label):
            raise UserError(f"{path} holds {data.shape} pixel rows for {len(label)} labels, not one 3,072-byte row "
                            "per image. The file is damaged: unpack the archive again")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows hold the R, G, B planes
        labels += label
    return np.concatenate(images), labels


def class_folders(names: List[str]) -> List[str]:
    """``<label>_<name>`` for every class, the label zero-padded so that sorting keeps CIFAR's order."""
    width = len(str(len(names) - 1))
    return [f"{label:0{width}d}_{name}" for label, name in enumerate(names)]


def convert(source: str, out: str, dataset: Optional[str] = None) -> Tuple[str, str, Dict[str, int]]:
    """Write ``out`` from the CIFAR batches in ``source``; return (dataset, out, images per split)."""
    found, folder = find_dataset(source)
    if dataset is not None and dataset != found:
        raise UserError(f"--source {source} holds {found}, not {dataset}: pass the {dataset} folder, or "
                        f"--dataset {found}")
    _, train_files, test_file, meta_file, label_key, names_key = LAYOUTS[found]
    meta = _read_batch(os.path.join(folder, meta_file))
    names = [name.decode() if isinstance(name, bytes) else str(name) for name in meta.get(names_key) or []]
    if not names:
        raise UserError(f"{os.path.join(folder, meta_file)} lists no {names_key}. The file is damaged: unpack the "
                        "archive again")
    splits = {"train": train_files, "val": [test_file]}
    # read (and check) everything before the output folder is touched
    data = {split: _split(folder, files, label_key) for split, files in splits.items()}
    for split, (_, labels) in data.items():
        bad = [label for label in labels if not 0 <= label < len(names)]
        if bad:
            raise UserError(f"the {split} batches of {folder} hold label {bad[0]}, outside the {len(names)} classes of "
                            f"{meta_file}. The files are damaged or from two versions: unpack the archive again")
    folders = class_folders(names)

    def write(staging: str) -> None:
        from PIL import Image

        for split, (images, labels) in data.items():
            for name in folders:
                os.makedirs(os.path.join(staging, split, name), exist_ok=True)
            for index, (pixels, label) in enumerate(zip(images, labels)):
                Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(
                    os.path.join(staging, split, folders[label], f"{index:05d}.png"))

    stamp = f"{found} {VERSION}"
    build_folder(out, stamp, lambda old: old.split()[0] == found, write, "ToE.common.cifar")
    return found, out, {split: len(labels) for split, (_, labels) in data.items()}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ToE.common.cifar", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True,
                        help="the unpacked python version of CIFAR: cifar-10-batches-py/ or cifar-100-python/ (or "
                             "the folder holding it)")
    parser.add_argument("--out", required=True, help="folder to write: train/<class>/*.png and val/<class>/*.png")
    parser.add_argument("--dataset", choices=list(LAYOUTS), default=None,
                        help="cifar10 or cifar100 (default: found from the files in --source)")
    args = parser.parse_args(argv)
    dataset, out, counts = convert(args.source, args.out, args.dataset)
    print(f"{dataset} in {out}: {counts['train']} train and {counts['val']} val images (32 px), "
          f"{len(os.listdir(os.path.join(out, 'train')))} classes")


if __name__ == "__main__":
    run_main(main)
