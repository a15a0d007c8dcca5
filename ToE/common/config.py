"""Recipes as data: ``-c/--config FILE.yaml`` and the recipe files beside every trainer.

timm's convention (its ``train.py``): the YAML file sets flag defaults and the command line
overrides them. Keys are the flags' destination names, as in a run's ``args.yaml``
(``lr: 1.0e-3``, ``model_kwargs: {embed_dim: 96}``, ``expansion_step: [0, 100, 200]``), so a run's
``args.yaml`` is itself a config: ``main.py -c OUT/args.yaml --output_dir NEW`` runs it again.

Every recipe is one file, ``ToE/<trainer>/configs/<name>.yaml``; the run scripts, the demos and
``bench/`` read those files, so a recipe's values are written once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# trainer name (as in run/demo.sh) -> its folder under ToE/
TRAINERS = {"deit": "deit", "lvvit": "lvvit", "et": "EfficientTrain", "yolos": "yolos"}
# keys a run writes into args.yaml beside its flags: what it derived (listed in the file under this key)
DERIVED = "derived"
# flags a config file does not set: where the configuration comes from, and what only the command
# line decides (a run's args.yaml holds them; read back as a config, they are left out)
COMMAND_LINE_ONLY = ("config", "check_only", "overwrite", "resume", "auto_resume", "eval")


def trainer_folder(trainer: str) -> str:
    if trainer not in TRAINERS:
        raise UserError(f"unknown trainer {trainer!r}. Pick one of {', '.join(TRAINERS)}")
    return os.path.join(ROOT, "ToE", TRAINERS[trainer])


def config_path(trainer: str, name: str) -> str:
    """The recipe file ``ToE/<trainer>/configs/<name>.yaml`` (absolute)."""
    return os.path.join(trainer_folder(trainer), "configs", f"{name}.yaml")


def main_path(trainer: str) -> str:
    """The trainer's ``main.py`` (absolute)."""
    return os.path.join(trainer_folder(trainer), "main.py")


def recipe_command(trainer: str, name: str, *overrides: str, python: Optional[str] = None,
                   config: Optional[str] = None) -> List[str]:
    """The command that runs recipe ``name`` of ``trainer`` (or the file ``config``) with ``overrides``."""
    return [python or sys.executable, main_path(trainer), "--config", config or config_path(trainer, name),
            *map(str, overrides)]


def load_config(path: str) -> Dict[str, Any]:
    """The mapping in ``path``; a missing, unreadable or malformed file is one UserError line."""
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist. Pass a recipe file, e.g. "
                        "ToE/deit/configs/imagenet_small.yaml, or a run's args.yaml") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} cannot be read ({error.__class__.__name__}). Check the path") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{line}. Fix the file (keys are flag names: "
                        "'lr: 1.0e-3')") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} holds a {type(data).__name__}, not a mapping of flag names to values. "
                        "Write one 'flag_name: value' per line")
    if DERIVED not in data:
        return data
    # a run's args.yaml: its flags, without what the run derived and what only a command line says
    derived = set(data.pop(DERIVED) or []) | set(COMMAND_LINE_ONLY)
    return {key: value for key, value in data.items() if key not in derived}


def _as_default(path: str, key: str, value: Any, default: Any) -> Any:
    """``value`` from the file in the form argparse expects of a default: scalars as text, so that
    the flag's own type and check read them as they read the command line (argparse converts a
    string default through ``type``); lists, mappings and switches as they are, shape-checked."""
    def refuse(expected: str) -> UserError:
        return UserError(f"config file {path}: {key} is {value!r}, expected {expected}. Fix the file")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise refuse("a mapping such as {embed_dim: 96}")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, list) or any(isinstance(item, (list, dict)) for item in value):
            raise refuse("a list such as [0, 100, 200]")
        kinds = {type(item) for item in default}
        if kinds <= {int} and default and not all(isinstance(item, int) and not isinstance(item, bool)
                                                  for item in value):
            raise refuse("a list of integers")
        if kinds <= {int, float} and default and not all(isinstance(item, (int, float)) and not isinstance(item, bool)
                                                         for item in value):
            raise refuse("a list of numbers")
        return value
    if isinstance(value, (list, dict)):
        if default is None:  # a flag with nargs and no default (e.g. --segments, --mid_pe_size)
            return value
        raise refuse("a single value")
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    return str(value)


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the defaults of its ``-c/--config`` file (timm's order: file, then command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, argv = _config_argument(argv)
    if path is None:
        return parser.parse_args(argv)
    set_config_defaults(parser, path)
    args = parser.parse_args(argv)
    args.config = path
    return args


def set_config_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the values of the config file ``path`` the flag defaults of ``parser``; a key that is not
    a flag, or a value of the wrong shape, is one UserError line."""
    config = load_config(path)
    defaults = vars(parser.parse_args([]))
    unknown = [key for key in config if key not in defaults or key in COMMAND_LINE_ONLY]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"config file {path}: {key} is not a flag of this trainer{hint}. Keys are flag names with "
                        "underscores, as in a run's args.yaml (--help lists the flags)")
    parser.set_defaults(**{key: _as_default(path, key, value, defaults[key]) for key, value in config.items()})


def _config_argument(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """Take ``-c FILE`` / ``--config FILE`` / ``--config=FILE`` out of ``argv``."""
    rest: List[str] = []
    path: Optional[str] = None
    tokens = iter(argv)
    for token in tokens:
        if token in ("-c", "--config"):
            path = next(tokens, None)
            if path is None or path.startswith("-"):
                raise UserError(f"{token} needs a file: {token} ToE/deit/configs/imagenet_small.yaml")
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
    return path, rest


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """``-c/--config`` in the help (it is read before the other flags, by ``parse_with_config``)."""
    parser.add_argument("-c", "--config", default="", metavar="FILE.yaml",
                        help="recipe file whose values are the flag defaults; flags on the command line override "
                             "them (e.g. ToE/deit/configs/imagenet_small.yaml, or a run's args.yaml)")


def scaled_stages(steps: Sequence[int], epochs_from: int, epochs_to: int) -> List[int]:
    """Stage starts ``steps`` of an ``epochs_from``-epoch recipe scaled to ``epochs_to`` epochs:
    proportional, strictly increasing, and a first stage that starts after epoch 0 still does."""
    scaled: List[int] = []
    for step in steps:
        value = int(step * epochs_to // epochs_from)
        if step > 0:
            value = max(value, 1)
        if scaled:
            value = max(value, scaled[-1] + 1)
        scaled.append(value)
    return scaled


def demo_epoch_flags(trainer: str, epochs: int, config: Optional[str] = None) -> List[str]:
    """Flags that shorten or lengthen a demo recipe to ``epochs``: its stage starts scaled to the
    new length, and the warm-up cut to what fits (a few-epoch smoke run has none)."""
    recipe = load_config(config or config_path(trainer, "demo"))
    flags = ["--epochs", str(epochs)]
    steps = recipe.get("expansion_step")
    if steps:
        flags += ["--expansion-step", *map(str, scaled_stages(steps, int(recipe["epochs"]), epochs))]
    warmup = int(recipe.get("warmup_epochs", 0))
    if warmup and warmup * 4 > epochs:
        flags += ["--warmup-epochs", str(epochs // 4)]
    return flags


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m ToE.common.config demo-flags TRAINER EPOCHS``: print those flags (for run/demo.sh)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["demo-flags", "path"])
    parser.add_argument("trainer", choices=list(TRAINERS))
    parser.add_argument("value", help="epochs (demo-flags) or recipe name (path)")
    args = parser.parse_args(argv)
    if args.what == "path":
        print(config_path(args.trainer, args.value))
    else:
        print(" ".join(demo_epoch_flags(args.trainer, int(args.value))))


if __name__ == "__main__":
    from .errors import run_main

    run_main(main)
