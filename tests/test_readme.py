"""The README's command lines stay true: every ``scfm`` subcommand and flag it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

from scfm_fast.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_readme_flags_exist():
    text = README.read_text()
    subs = _subparsers()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    seen = set()
    for block in blocks:
        for cmd in re.split(r"\n(?!\s)", block.replace("\\\n", " ")):
            words = cmd.split()
            if len(words) < 2 or words[0] != "scfm":
                continue
            sub = words[1]
            assert sub in subs, f"README shows `scfm {sub}`, which does not exist"
            known = {s for a in subs[sub]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cmd):
                assert flag in known, f"README shows `scfm {sub} {flag}`, which the parser does not accept"
            seen.add(sub)
    assert {"tokenize", "medians", "embed", "perturb"} <= seen


def test_readme_two_commands_exist():
    text = README.read_text()
    assert "./dev.sh demo" in text and "./dev.sh test" in text
    assert "./dev.sh test" in (README.parent / ".ci" / "run").read_text()
