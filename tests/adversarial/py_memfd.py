# class: exhaust
# expect: OK
# output: SAFE
# Hold memory outside RLIMIT_AS (64 MB here): memfds (each under RLIMIT_FSIZE, and as many as
# the open-files limit allows), POSIX and System V shared memory, a shared mapping. Anything
# past 128 MB held at once is a leak of the memory limit.
import ctypes
import mmap
import os

MB = 1 << 20
held = {}
block = b"x" * MB
try:
    for _ in range(8):
        fd = os.memfd_create("hoard")
        for _ in range(60):  # under the 64 MB file-size limit
            os.write(fd, block)
        held["memfd"] = held.get("memfd", 0) + os.fstat(fd).st_size // MB
except OSError:
    pass
try:
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=512 * MB)
    shm.buf[::4096] = b"x" * len(shm.buf[::4096])
    held["posix shm"] = 512
except (OSError, ImportError, ValueError):
    pass
libc = ctypes.CDLL(None, use_errno=True)
shmid = libc.shmget(0, 512 * MB, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
if shmid >= 0:
    held["sysv shm"] = 512
try:
    anonymous = mmap.mmap(-1, 512 * MB, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    anonymous[::4096] = b"x" * len(anonymous[::4096])
    held["shared mapping"] = 512
except (OSError, ValueError):
    pass
leaks = {k: v for k, v in held.items() if v > 128}
print("SAFE" if not leaks else f"LEAK {leaks}")
