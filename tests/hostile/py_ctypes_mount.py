# expect: SANDBOX_VIOLATION
import ctypes

ctypes.CDLL(None).mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)
