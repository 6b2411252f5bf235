#!/usr/bin/env python3
"""Regenerate (--write) or check (--check, the default) the command reference in
README.md, between the reference markers, from flowforge.py's command registry."""
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import flowforge  # noqa: E402

START, END = "<!-- reference:start -->", "<!-- reference:end -->"
README = os.path.join(HERE, "README.md")


def expected(text):
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + "\n" + flowforge.command_reference() + END + tail


def main():
    text = open(README, encoding="utf-8").read()
    new = expected(text)
    if "--write" in sys.argv[1:]:
        if new != text:
            with open(README, "w", encoding="utf-8") as f:
                f.write(new)
            print("README.md reference updated")
        return 0
    if new != text:
        print("README.md reference is stale: run `make readme`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
