# class: worker
# expect: RUNTIME_ERROR
# Print what the sandbox used to print when a test's process could not enter it, and exit with
# its status: the worker must not take that for its own failure (and restart, twice a test).
import os
import sys

for errno in range(1, 4):
    sys.stderr.write(f"rlef-sandbox-setup-failed errno={errno:03d}\n")
sys.stderr.flush()
os._exit(120)
