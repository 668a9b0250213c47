"""The ``centrifuge`` command. Each subcommand lives in its own module, which
provides ``add_arguments(parser)`` and ``run(args) -> int``.

Every error a command raises ends it with one line on stderr naming the
problem (exit status 2 for bad input, 1 for an internal error);
``--debug`` or ``CENTRIFUGE_DEBUG=1`` shows the traceback instead. Ctrl-C and
SIGTERM interrupt every command alike (exit status 128 + the signal number)."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from centrifuge.interrupt import Interrupted, interrupts_raise

COMMANDS = {
    "train": ("centrifuge.training.cli", "train a model with token filtering"),
    "bench": ("centrifuge.bench.cli", "time dense vs masked filtering vs Centrifuge"),
    "score": ("centrifuge.scoring.cli", "store reference-model losses beside a dataset"),
    "eval": ("centrifuge.evaluation.cli", "held-out loss and task accuracy of a checkpoint"),
}
DEBUG_ENV = "CENTRIFUGE_DEBUG"
# Bad input: missing or unreadable files, malformed data, options that do not fit.
USER_ERRORS = (ValueError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where it would mislead: a flag is off
    unless given (``--no-hf``'s default is ``hf=True``, which reads as the flag
    being on), and a required option has none."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The ``centrifuge`` parser, and the module of every subcommand it has."""
    parser = argparse.ArgumentParser(
        prog="centrifuge", description="Fast token-filtered LLM training."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full traceback (or set {DEBUG_ENV}=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (module + ".").startswith(e.name + "."):
                raise  # a real missing dependency inside the module
            continue
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=HelpFormatter)  # fmt: skip
        modules[name].add_arguments(p)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    with interrupts_raise():
        return _run(modules[args.command], args)


def _run(module, args) -> int:
    if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return int(module.run(args) or 0)
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None
    prefix = f"centrifuge {args.command}" + (f" (rank {rank})" if rank is not None else "")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"{prefix}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except USER_ERRORS as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, and the way to see more
        print(f"{prefix}: internal error: {type(e).__name__}: {e} (rerun with --debug "
              f"or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
