"""The published ToE command-line flags, defined once for every trainer."""

from __future__ import annotations

import argparse

from token_select import TokenSelect

from .errors import UserError


def add_toe_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the Token Expansion flags (published names and defaults) to ``parser``."""
    group = parser.add_argument_group("Token Expansion (ToE)")
    group.add_argument("--expansion-step", type=int, nargs="+", default=[0, 100, 200],
                       help="epoch at which each ToE stage starts (default: 0 100 200)")
    group.add_argument("--keep-rate", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                       help="share of patch tokens kept in each stage; 1.0 in the last stage trains "
                            "on all tokens (default: 0.5 0.75 1.0)")
    group.add_argument("--initialization-keep-rate", type=float, default=0.25,
                       help="share of seed tokens spread before expansion (default: 0.25)")
    group.add_argument("--expansion-multiple-stage", type=int, default=2,
                       help="repetition steps of the expansion in each stage (default: 2)")
    group.add_argument("--distance", default="cosine", choices=["cosine", "manhattan", "euclidean"],
                       help="token similarity used to expand and merge (default: cosine)")
    group.add_argument("--initialization", default="stride", choices=["stride", "uniform"],
                       help="seed layout: 'stride' is the published rule, 'uniform' spreads seeds over "
                            "the whole patch grid (default: stride)")
    group.add_argument("--sparse-eval", action="store_true",
                       help="also reduce tokens during evaluation (off by default: evaluation uses all tokens)")
    return group


def build_token_select(args: argparse.Namespace) -> TokenSelect:
    """The TokenSelect described by the flags; a bad schedule becomes a UserError."""
    try:
        token_select = TokenSelect(
            expansion_step=args.expansion_step,
            keep_rate=args.keep_rate,
            initialization_keep_rate=args.initialization_keep_rate,
            expansion_multiple_stage=args.expansion_multiple_stage,
            distance=args.distance,
            initialization=args.initialization,
        )
    except ValueError as error:
        raise UserError(f"bad ToE schedule: {error}. Fix --expansion-step/--keep-rate/"
                        "--initialization-keep-rate/--expansion-multiple-stage") from None
    token_select.sparse_inference = bool(args.sparse_eval)
    return token_select


class ParseKwargs(argparse.Action):
    """``--model-kwargs embed_dim=96 depth=6`` -> {"embed_dim": 96, "depth": 6} (Python literals)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects key=value pairs; got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)
