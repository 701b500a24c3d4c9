# class: exhaust
# expect: OK
# output: BOUNDED
# POSIX timers are kernel objects outside RLIMIT_AS (about 400 bytes each), bounded only by
# RLIMIT_SIGPENDING: ~96,000 here (37 MB of kernel memory per test), millions on a large node;
# without root they also count against the user's own pending signals, the trainer's.
import ctypes

libc = ctypes.CDLL(None, use_errno=True)


class SigEvent(ctypes.Structure):
    _fields_ = [
        ("value", ctypes.c_long),
        ("signo", ctypes.c_int),
        ("notify", ctypes.c_int),
        ("pad", ctypes.c_int * 12),
    ]


event = SigEvent(0, 0, 1)  # SIGEV_NONE
timer = ctypes.c_int()
n = 0
while n < 1_000_000 and libc.timer_create(1, ctypes.byref(event), ctypes.byref(timer)) == 0:
    n += 1
print("BOUNDED" if n <= 4096 else f"UNBOUNDED {n}")
