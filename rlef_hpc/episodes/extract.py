"""Finding the code in a model's answer.

Rules (the instruction asks for one fenced block):
- A block opens with a line-leading ``` (optionally followed by a tag) and closes at the next
  line-leading ```. A block still open at the end of the answer (the model ran out of tokens)
  runs to the end of the answer.
- Tags: python, py, python3 mean Python; cpp, c++, cc, cxx mean C++. A block tagged with the
  requested language wins; else an untagged block; a block tagged with another language is
  never taken. Among several candidates of the same kind, the last one wins (models revise).
- No candidate: the answer has no valid code. Whether the code parses (Python) or compiles
  (C++, in the sandbox) decides the rest of "valid".
"""

from __future__ import annotations

import re

TAGS = {
    "python": {"python", "py", "python3"},
    "cpp": {"cpp", "c++", "cc", "cxx"},
}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)(.*)$")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(tag, code) for every fenced block, in order; the tag lower-cased ('' if none).

    Besides the usual form, `` ```python print(1) ``` `` on one line, and a block whose last
    code line ends with the closing fence (`print(x)```), are blocks too: the instruction's own
    example is written that way."""
    blocks: list[tuple[str, str]] = []
    tag: str | None = None  # the open block's tag; None when no block is open
    body: list[str] = []
    for line in text.split("\n"):
        fence = _FENCE.match(line)
        if tag is None:
            if fence is None:
                continue
            tag, rest = fence[1].lower(), fence[2].strip()
            if "```" in rest:  # opened and closed on one line
                blocks.append((tag, rest[: rest.index("```")].strip()))
                tag = None
            else:
                body = [rest] if rest else []
        elif fence is not None or line.rstrip().endswith("```"):
            last = line.rstrip()[:-3]
            if fence is None and last.strip():
                body.append(last)
            blocks.append((tag, "\n".join(body)))
            tag = None
        else:
            body.append(line)
    if tag is not None:
        blocks.append((tag, "\n".join(body)))
    return blocks


def extract_code(text: str, language: str) -> str | None:
    """The code the answer submits in `language`, or None when there is none."""
    wanted = TAGS[language]
    blocks = code_blocks(text)
    tagged = [code for tag, code in blocks if tag in wanted]
    untagged = [code for tag, code in blocks if tag == ""]
    chosen = (tagged or untagged or [None])[-1]
    if chosen is None or not chosen.strip():
        return None
    return chosen.rstrip() + "\n"


def python_parses(code: str) -> bool:
    try:
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError):
        return False
    return True
