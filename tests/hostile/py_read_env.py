# expect: OK
# output: SAFE
# The harness runs with RLEF_TEST_SECRET in its environment: nothing here may see it.
import glob
import os

found = any("RLEF_TEST_SECRET" in k or "hunter2" in v for k, v in os.environ.items())
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
    try:
        with open(path, "rb") as f:
            found |= b"hunter2" in f.read()
    except OSError:
        pass
print("LEAK" if found else "SAFE")
