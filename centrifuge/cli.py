"""The ``centrifuge`` command. Each subcommand lives in its own module, which
provides ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("centrifuge.training.cli", "train a model with token filtering"),
    "bench": ("centrifuge.bench.cli", "time dense vs masked filtering vs Centrifuge"),
    "score": ("centrifuge.scoring.cli", "store reference-model losses beside a dataset"),
    "eval": ("centrifuge.evaluation.cli", "held-out loss and task accuracy of a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="centrifuge", description="Fast token-filtered LLM training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (module + ".").startswith(e.name + "."):
                raise  # a real missing dependency inside the module
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
