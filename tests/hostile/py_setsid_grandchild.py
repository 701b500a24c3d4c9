# expect: SANDBOX_VIOLATION
# A grandchild in its own session, holding stdout open long after the test "ends".
import os
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1000)
    os._exit(0)
print(3)
