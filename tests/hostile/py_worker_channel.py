# expect: OK
# output: SAFE
# The worker's channel to the executor must not be reachable: forging a result through it
# would let a solution pass tests it fails.
import os

reachable = []
for fd in range(3, 256):
    try:
        os.fstat(fd)
        reachable.append(fd)
    except OSError:
        pass
print("SAFE" if not reachable else f"LEAK {reachable}")
