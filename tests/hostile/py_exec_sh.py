# expect: SANDBOX_VIOLATION
import os

os.execv("/bin/sh", ["sh", "-c", "echo pwned > /tmp/rlef_hostile_sentinel"])
