"""README.md's CLI synopsis names every flag of every `rgan` subcommand, and no flag that is gone.

The synopsis is what a user reads first; flags added later (`sweep --num-cpus`, `generate --steps/--gif/--no-ema`)
were missing from it (issue 19). The flags come from the real argparse parsers (`launcher.cli.COMMANDS`), so a
new flag fails this test until the README names it; the failure says which flag of which command.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from launcher.cli import COMMANDS, _load

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## The CLI"


def parser_flags(command: str) -> list[tuple[str, ...]]:
    """Each documented option of `rgan COMMAND` as its long spellings (`--help` and hidden options left out)."""
    p = argparse.ArgumentParser(prog=f"rgan {command}")
    _load(COMMANDS[command][1])(p)
    out = []
    for action in p._actions:
        longs = tuple(s for s in action.option_strings if s.startswith("--"))
        if longs and action.help is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            out.append(longs)
    return out


def synopsis() -> dict[str, str]:
    """The README's synopsis block (the first code block under "## The CLI"): command -> its text, continuation
    lines (indented) included, comments (`# ...`) left out."""
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    block = text.split(HEADING, 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        code = line.split("  #", 1)[0]
        m = re.match(r"^rgan (\w+)", code)
        if m:
            current = m.group(1)
            out[current] = out.get(current, "") + " " + code
        elif current and code.startswith(" "):
            out[current] += " " + code
    return out


def test_the_readme_synopsis_names_every_flag_of_every_command():
    documented = synopsis()
    problems = [f"`rgan {c}` has no line in README.md's synopsis ({HEADING})" for c in COMMANDS if c not in documented]
    for command, text in documented.items():
        if command not in COMMANDS:
            problems.append(f"README.md's synopsis lists `rgan {command}`, which is no command")
            continue
        named = set(re.findall(r"--[\w-]+", text))
        flags = parser_flags(command)
        for spellings in flags:
            if not named & set(spellings):
                problems.append(f"README.md synopsis: `rgan {command}` lacks {spellings[0]}")
        known = {s for spellings in flags for s in spellings}
        problems += [f"README.md synopsis: `rgan {command}` names {flag}, which the parser does not have"
                     for flag in sorted(named - known)]
    assert not problems, "\n".join(problems)
