# class: judge
# expect: WRONG_ANSWER
# 30 MB of one-byte tokens where one is expected: splitting it all costs the trainer hundreds
# of megabytes; the comparison stops at the second token.
import sys

sys.stdout.write("1 " * (15 << 20))
