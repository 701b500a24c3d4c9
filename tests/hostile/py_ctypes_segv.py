# expect: RUNTIME_ERROR
import ctypes

ctypes.memmove(16, b"crash", 5)
