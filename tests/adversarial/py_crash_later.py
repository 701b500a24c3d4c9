# class: host
# expect: RUNTIME_ERROR
# Waits (the test looks at it from outside meanwhile), then crashes. A dumpable process that
# crashes dumps core to the host's core_pattern: where that is a pipe (apport, systemd-coredump),
# the kernel runs the host's handler as root for it, whatever RLIMIT_CORE says.
import ctypes
import time

time.sleep(1.5)
ctypes.string_at(0)
