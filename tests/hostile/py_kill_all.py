# expect: SANDBOX_VIOLATION
import os
import signal

os.kill(-1, signal.SIGKILL)
