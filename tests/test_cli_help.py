"""Every subcommand's --help: each option says what it does, and no flag shows a
default that contradicts what happens without it."""

import argparse
import re
from pathlib import Path

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



README = (Path(__file__).parents[1] / "README.md").read_text()


def test_options_that_may_change_on_resume_are_the_same_in_help_readme_and_code():
    from centrifuge.training.cli import resumable_flags

    flags = set(resumable_flags())
    (resume,) = [a for a in dict(SUBCOMMANDS)["train"]._actions if "--resume" in a.option_strings]
    listed = re.search(r"give only those that may change \(([^)]*)", resume.help).group(1)
    assert set(re.findall(r"--[a-z-]+", listed)) == flags
    readme = re.search(r"options that may change are (.*?)and any other option", README, re.S).group(1)
    assert set(re.findall(r"--[a-z-]+", readme)) == flags


def test_readme_api_example_leaves_the_set_up_commands_run_alone():
    """The set-up command trains into the default directory; the Python example
    run after it must not find a run there."""
    from centrifuge.training import TrainConfig

    (example,) = re.findall(r'train\(TrainConfig\(.*out_dir="([^"]+)"', README)
    assert example != TrainConfig().out_dir


@pytest.mark.parametrize("name, new, old", [
    ("bench", ["--model", "tiny", "--batch-size", "3", "--out-dir", "o"],
     ["--preset", "tiny", "--batch", "3", "--out", "o"]),
    ("score", ["--model", "m", "--dtype", "bf16", "--out-dir", "o", "--store-dtype", "float16"],
     ["--model", "m", "--precision", "bf16", "--out", "o", "--dtype", "float16"]),
])  # fmt: skip
def test_shared_option_names_keep_their_old_spellings(name, new, old):
    parser = dict(SUBCOMMANDS)[name]
    assert vars(parser.parse_args(new)) == vars(parser.parse_args(old))
