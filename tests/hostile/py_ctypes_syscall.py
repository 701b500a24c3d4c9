# expect: SANDBOX_VIOLATION
# Raw syscall(2) through ctypes: socket(AF_INET, SOCK_STREAM, 0) without the socket module.
import ctypes

libc = ctypes.CDLL(None)
libc.syscall(41, 2, 1, 0)
