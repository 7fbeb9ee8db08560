"""The man pages and the bash completion are generated from the argument parser and committed: no drift."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from vmshare_libvirt.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "scripts" / "gen-man.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return gen.render(build_parser())


def test_committed_pages_and_completion_match_the_parser(files):
    differ = [rel for rel, text in files.items()
              if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != text]
    stale = [str(p.relative_to(ROOT)) for p in (ROOT / "man").glob("vmshare*.1") if str(p.relative_to(ROOT)) not in files]
    assert not differ and not stale, (f"out of date: {differ + stale}; run 'python3 scripts/gen-man.py' "
                                      "and commit man/ and completion/")


def test_one_page_per_command_and_every_option_documented(files):
    parser = build_parser()
    commands = gen.subcommands(parser)
    assert set(files) == {"man/vmshare.1", "completion/vmshare"} | {f"man/vmshare-{c}.1" for c in commands}
    for name, sub in commands.items():
        text = files[f"man/vmshare-{name}.1"]
        parsers = [sub, *gen.subcommands(sub).values()]
        for p in parsers:
            for action in gen.arguments(p):  # all but -h/--help
                for option in action.option_strings:
                    assert gen.bold(option) in text, f"vmshare {name}: {option} missing from its page"
        assert f"\\fBvmshare\\-{name}\\fR(1)" in files["man/vmshare.1"]
        assert f" {name})" in files["completion/vmshare"]


def test_every_command_and_action_says_what_it_does():
    parser = build_parser()
    for name, sub in gen.subcommands(parser).items():
        assert sub.description or gen.summary(parser, name), f"vmshare {name} has neither description nor help"
        for action, action_parser in gen.subcommands(sub).items():
            assert action_parser.description, f"vmshare {name} {action} has no description"


@pytest.mark.parametrize("text, expected", [
    ("a-b", "a\\-b"), ("back\\slash", "back\\eslash"), (".starts with a dot", "\\&.starts with a dot"),
    ("'quote", "\\&'quote"),
])
def test_roff_escaping(text, expected):
    assert gen.roff(text) == expected


def test_pages_do_not_depend_on_the_terminal_width(monkeypatch, files):
    monkeypatch.setenv("COLUMNS", "40")
    assert gen.render(build_parser()) == files
    assert not any(re.search(r"/work/|\.venv|pytest", text) for text in files.values())
