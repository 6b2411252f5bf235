#!/usr/bin/env python3
"""Regenerate (--write) or check (--check, the default) the generated parts of
README.md, each between its markers: the command reference (from flowforge.py's
command registry) and the table of time and day forms (from TIME_FORMS and
DAY_FORMS, the lists that FlowForge's own error messages name)."""
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import flowforge  # noqa: E402

README = os.path.join(HERE, "README.md")
BLOCKS = (("reference", flowforge.command_reference), ("time-forms", flowforge.time_forms_reference))


def expected(text):
    for name, render in BLOCKS:
        start, end = "<!-- %s:start -->" % name, "<!-- %s:end -->" % name
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + "\n" + render() + end + tail
    return text


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
