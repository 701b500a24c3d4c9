# expect: SANDBOX_VIOLATION
import os
import signal

os.kill(os.getppid(), signal.SIGKILL)
