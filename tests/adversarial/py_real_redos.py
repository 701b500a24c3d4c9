# class: judge
# expect: WRONG_ANSWER
# One token of a million digits and a letter where a real is expected: the judge's number
# pattern backtracked over it quadratically (hours in the trainer's judging thread).
import sys

sys.stdout.write("1" * 1_000_000 + "x\n")
