# class: privileges
# expect: SANDBOX_VIOLATION
# Kill the worker (PID 1 of the namespace) with tgkill, which names a thread: the kernel lets a
# process signal another of the same uid, so only the sandbox can stop it.
import ctypes
import signal

SYS_tgkill = 234
ctypes.CDLL(None).syscall(SYS_tgkill, 1, 1, signal.SIGKILL)
print("still here")
