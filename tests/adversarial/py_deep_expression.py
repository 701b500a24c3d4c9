# class: break
# expect: COMPILE_ERROR
# 3,000 unary minus signs: CPython's parser runs out of its own stack (MemoryError, not a
# SyntaxError), and compiling it used to fail the worker (SANDBOX_ERROR, worker replaced). The
# test writes them in (@DEEP@ below): written out here they would overflow a linter's stack too.
x = 1  # @DEEP@
print(x)
