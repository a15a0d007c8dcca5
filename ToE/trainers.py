"""The trainers of this project, listed once.

Everything that names the trainers reads this table: the recipe files (``ToE.common.config``),
``run/demo.sh``, the GPU check, the benches and the tests. A new trainer is one more row here and a
folder ``ToE/<folder>/`` with its ``main.py``, ``configs/`` and ``run/``.

    python3 ToE/trainers.py        # "name folder" lines, for the shell scripts

Standard library only, and importable without the ``ToE`` package's dependencies: ``run/demo.sh``
reads it before ``.venv`` exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Trainer:
    name: str  # as on the command line: bash run/demo.sh NAME, python -m ToE.common.config demo-flags NAME
    folder: str  # ToE/<folder>/ holds main.py, configs/ and run/
    title: str  # how tables and reports name it

    @property
    def package(self) -> str:
        """The trainer's package, e.g. ``ToE.deit``."""
        return f"ToE.{self.folder}"

    @property
    def module(self) -> str:
        """Its entry module (``parse_args``, ``main``, ``cli``), e.g. ``ToE.deit.main``."""
        return f"{self.package}.main"

    @property
    def main(self) -> str:
        """Its ``main.py``, relative to the repository root, e.g. ``ToE/deit/main.py``."""
        return f"ToE/{self.folder}/main.py"


TRAINERS: Dict[str, Trainer] = {trainer.name: trainer for trainer in (
    Trainer("deit", "deit", "DeiT"),
    Trainer("lvvit", "lvvit", "LV-ViT"),
    Trainer("et", "EfficientTrain", "EfficientTrain"),
    Trainer("yolos", "yolos", "YOLOS"),
)}


if __name__ == "__main__":
    for trainer in TRAINERS.values():
        print(trainer.name, trainer.folder)
