# expect: RUNTIME_ERROR
# Recursion through C (repr -> __repr__ -> repr ...) overflows the real stack, not the heap.
import sys

sys.setrecursionlimit(10**9)


class Node:
    def __repr__(self):
        return repr(self)


print(repr(Node()))
