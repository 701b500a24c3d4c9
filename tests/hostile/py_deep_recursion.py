# expect: MEMORY_LIMIT
# Pure-Python recursion lives on the heap in CPython 3.11: it runs out of memory, and must end
# there (not sit at its limit until the deadline).
import sys

sys.setrecursionlimit(10**9)


def down(n):
    return down(n + 1) + 1


down(0)
