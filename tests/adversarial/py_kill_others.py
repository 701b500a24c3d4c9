# class: worker
# expect: SANDBOX_VIOLATION
# Kill every other process of the namespace (the template that Python tests are forked from
# is one): the next Python test would then have nothing to start from.
import os
import signal

for pid in range(2, 200):
    if pid != os.getpid():
        os.kill(pid, signal.SIGKILL)
print("still here")
