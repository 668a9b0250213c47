"""Every subcommand's --help: each option says what it does, and no flag shows a
default that contradicts what happens without it."""

import argparse
import re

import pytest

from centrifuge.cli import build_parser


def _subcommands():
    parser, _ = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices.items())


SUBCOMMANDS = _subcommands()


@pytest.mark.parametrize("name,parser", SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_every_option_has_a_help_text_and_flags_show_no_contrary_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        what = f"centrifuge {name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help is not argparse.SUPPRESS, f"{what} has no help text"
        shown = formatter._expand_help(action)  # the text --help prints for it
        if action.nargs != 0 or action.dest == "help":
            continue
        # A flag (store_true / store_false) is off unless given.
        if action.default is not argparse.SUPPRESS:
            assert action.default != action.const, f"{what} changes nothing when given"
        default = re.search(r"\(default: ([^)]*)\)", shown)
        assert default is None or default.group(1) in ("False", "off"), (
            f"{what} is off unless given, but its help says {default.group(0)!r}"
        )

