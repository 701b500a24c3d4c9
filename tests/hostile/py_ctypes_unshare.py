# expect: SANDBOX_VIOLATION
# A new user namespace would make the test root again, inside it.
import ctypes

CLONE_NEWUSER = 0x10000000
ctypes.CDLL(None).unshare(CLONE_NEWUSER)
