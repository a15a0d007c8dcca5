"""Recipes as data: ``-c/--config FILE.yaml`` and the recipe files beside every trainer.

timm's convention (its ``train.py``): the YAML file sets flag defaults and the command line
overrides them. Keys are the flags' destination names, as in a run's ``args.yaml``
(``lr: 1.0e-3``, ``model_kwargs: {embed_dim: 96}``, ``expansion_step: [0, 100, 200]``), so a run's
``args.yaml`` is itself a config: ``main.py -c OUT/args.yaml --output_dir NEW`` runs it again.
Every value goes through its flag's own type, choice, count and range check (``checked_value``),
as if it had been typed on the command line; a key written twice and a second ``--config`` are
refused, and the trainers' parsers match no flag prefixes (``--conf`` is not ``--config``).

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

from ..trainers import TRAINERS
from .args import COMMAND_LINE_ONLY
from .errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# keys a run writes into args.yaml beside its flags: what it derived (listed in the file under this key)
DERIVED = "derived"


def trainer_folder(trainer: str) -> str:
    if trainer not in TRAINERS:
        raise UserError(f"unknown trainer {trainer!r}. Pick one of {', '.join(TRAINERS)}")
    return os.path.join(ROOT, "ToE", TRAINERS[trainer].folder)


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


class _DuplicateKey(yaml.YAMLError):
    """A key written twice in one mapping of a config file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps
    the last value without a word, so a recipe edited by appending a line silently changes)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:  # an unhashable key: the safe loader's own error names it
            break
        if first != line:
            raise _DuplicateKey(f"{key} is written twice (lines {first} and {line})")
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str) -> Dict[str, Any]:
    """The mapping in ``path``; a missing, unreadable or malformed file (a key written twice too)
    is one UserError line."""
    try:
        with open(path) as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist. Pass a recipe file, e.g. "
                        "ToE/deit/configs/imagenet_small.yaml, or a run's args.yaml") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} cannot be read ({error.__class__.__name__}). Check the path") from None
    except _DuplicateKey as error:
        raise UserError(f"config file {path}: {error}. Keep one of them") from None
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


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Destination name -> the action that reads its value (an alias that only stores a constant,
    such as LV-ViT's --apex-amp for amp_dtype, gives way to the flag that takes the value)."""
    actions: Dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest in (argparse.SUPPRESS, "help"):
            continue
        if action.dest not in actions or (actions[action.dest].nargs == 0 and action.nargs != 0
                                          and not isinstance(action, _SWITCHES)):
            actions[action.dest] = action
    return actions


def checked_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` of ``key`` in the config file ``path``, put through the same type, choice, count and
    range checks as the flag's value on the command line, converted as the command line would be.

    argparse checks neither types nor choices of defaults, and a config file's values become
    defaults (timm's convention), so without this ``vpt: Deep`` or ``data_backend: DALI`` would run
    something other than what ``args.yaml`` then records. A bad value is one UserError line."""
    flag = next((name for name in action.option_strings if name.startswith("--")), key)

    def refuse(problem: str, fix: str = "Fix the file") -> UserError:
        shown = {None: "null", True: "true", False: "false"}.get(value, repr(value)) \
            if value is None or isinstance(value, bool) else repr(value)  # as YAML reads it
        return UserError(f"config file {path}: {key} is {shown}, {problem}. {fix}")

    if isinstance(action, _SWITCHES) or action.nargs == 0:
        if not isinstance(value, bool):
            raise refuse("expected true or false")
        return value
    if getattr(action, "takes_mapping", False):
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise refuse("expected a mapping such as {embed_dim: 96}")
        return value
    if value is None:
        if action.default is None:
            return None
        raise refuse(f"but {flag} needs a value (its default: {action.default!r})",
                     "Give a value, or delete the line for the default")

    def one(item: Any) -> Any:
        if isinstance(item, bool):
            raise refuse(f"a YAML boolean, but {flag} takes {'text' if action.type is None else 'a number'} "
                         "(YAML reads unquoted yes/no/on/off/true/false as booleans)", "Quote the text: 'off'")
        if isinstance(item, (list, dict)):
            raise refuse(f"expected {'a single value' if action.nargs in (None, '?') else 'a flat list'}")
        converted = item
        if action.type is not None:
            try:
                converted = action.type(str(item))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                kind = {int: "an integer", float: "a number"}.get(action.type)
                detail = f"{str(item)!r} is not {kind}" if kind else (str(error) or f"not a valid {flag} value")
                if action.nargs not in (None, "?"):
                    plural = {int: "integers", float: "numbers"}.get(action.type, "values")
                    raise refuse(f"expected a list of {plural} ({detail})") from None
                raise refuse(detail) from None
        elif not isinstance(item, str):
            converted = str(item)
        if action.choices is not None and converted not in action.choices:
            raise refuse(f"not one of {', '.join(map(str, action.choices))}")
        return converted

    if action.nargs in (None, "?"):
        if isinstance(value, list):
            raise refuse(f"expected a single value ({flag} takes one)")
        return one(value)
    example = f"[{', '.join(map(str, action.default))}]" if isinstance(action.default, (list, tuple)) and \
        action.default else "[0, 100, 200]"
    if not isinstance(value, list):
        raise refuse(f"expected a list such as {example}")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise refuse(f"expected a list of {action.nargs} values")
    if action.nargs == "+" and not value:
        raise refuse("expected a list of at least one value")
    return [one(item) for item in value]


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
    a flag, or a value its flag would refuse on the command line, is one UserError line."""
    config = load_config(path)
    actions = _flag_actions(parser)
    unknown = [key for key in config if key not in actions or key in COMMAND_LINE_ONLY]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"config file {path}: {key} is not a flag of this trainer{hint}. Keys are flag names with "
                        "underscores, as in a run's args.yaml (--help lists the flags)")
    parser.set_defaults(**{key: checked_value(path, key, value, actions[key]) for key, value in config.items()})


def _config_argument(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """Take ``-c FILE`` / ``-cFILE`` / ``--config FILE`` / ``--config=FILE`` out of ``argv``; more
    than one is refused (the second would silently replace the first, e.g. a run script's recipe)."""
    rest: List[str] = []
    paths: List[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("-c", "--config"):
            path = next(tokens, None)
            if path is None or path.startswith("-"):
                raise UserError(f"{token} needs a file: {token} ToE/deit/configs/imagenet_small.yaml")
            paths.append(path)
        elif token.startswith("--config="):
            paths.append(token.split("=", 1)[1])
        elif token.startswith("-c") and not token.startswith("--"):  # argparse's -cFILE and -c=FILE
            paths.append(token[2:].removeprefix("="))
        else:
            rest.append(token)
    if any(not path for path in paths):
        raise UserError("--config needs a file: --config ToE/deit/configs/imagenet_small.yaml")
    if len(paths) > 1:
        raise UserError(f"--config is given {len(paths)} times ({', '.join(paths)}; a run script passes its recipe "
                        "itself): one recipe file per run. Override its values with flags (e.g. --lr 1e-3), or copy "
                        "the recipe and edit the copy")
    return (paths[0] if paths else None), rest


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
