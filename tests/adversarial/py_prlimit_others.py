# class: privileges
# expect: OK
# output: SAFE
# Set the worker's (PID 1's) and every other process's limits to nothing: the worker could
# then never start another test. prlimit64 may touch the test itself only.
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
RLIMIT_NOFILE, RLIMIT_NPROC = 7, 6
zero = (ctypes.c_uint64 * 2)(0, 0)
changed = []
for pid in range(1, 64):
    if pid == os.getpid():
        continue
    for resource in (RLIMIT_NOFILE, RLIMIT_NPROC):
        if libc.prlimit64(pid, resource, zero, None) == 0:
            changed.append(pid)
print("SAFE" if not changed else f"LEAK {sorted(set(changed))}")
