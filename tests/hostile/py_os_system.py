# expect: SANDBOX_VIOLATION
import os

os.system("echo pwned > /tmp/rlef_hostile_sentinel")
print(3)
