# class: host
# expect: WRONG_ANSWER
# The reward hack: find this very input among the problem files on the machine (the installed
# package's bundled set, a run's problems/) and print the recorded output. Solves every problem
# it can reach, privately tested or not; must reach none.
import json
import os
import sys

stdin = sys.stdin.read()


def lookup(path):
    try:
        lines = open(path).read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        try:
            problem = json.loads(line)
        except ValueError:
            continue
        for kind in ("public_tests", "private_tests", "generated_tests"):
            tests = problem.get(kind) or {}
            for given, wanted in zip(tests.get("input", []), tests.get("output", []), strict=False):
                if given == stdin:
                    return wanted
    return None


def candidates():
    yield from "@PROBES@"  # where the attacker, having read the source, knows they are
    for root in ("/", "/work", "/root", "/home", "/tmp", "/usr"):
        for seen, (d, _, files) in enumerate(os.walk(root)):
            if seen > 20000:
                break
            yield from (os.path.join(d, f) for f in files if f.endswith(".jsonl"))


for path in candidates():
    if (answer := lookup(path)) is not None:
        print(answer, end="")
        sys.exit(0)
print("not found")
