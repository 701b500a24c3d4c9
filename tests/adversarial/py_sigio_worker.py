# class: signals
# expect: OK
# output: SURVIVED
# Signals by another road than kill: the worker (pid 1) made the owner of our stdout and stderr
# pipes with SIGKILL as their signal (F_SETOWN, F_SETSIG, O_ASYNC), then stderr (whose output is
# not capped) filled again and again, so that each read the worker makes of a full pipe wakes a
# writer and the kernel signals the owner; and the same
# through a directory notification (dnotify) on /tmp. Root: the uids differ; without root, only
# Landlock's signal scope (which covers these) stands between them.
import fcntl
import os
import signal

F_SETSIG = 10
for fd in (1, 2):
    fcntl.fcntl(fd, fcntl.F_SETOWN, 1)
    fcntl.fcntl(fd, F_SETSIG, signal.SIGKILL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
tmp = os.open("/tmp", os.O_RDONLY)
fcntl.fcntl(tmp, fcntl.F_SETOWN, 1)
fcntl.fcntl(tmp, F_SETSIG, signal.SIGKILL)
fcntl.fcntl(tmp, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
for i in range(100):
    os.close(os.open(f"/tmp/{i}", os.O_CREAT | os.O_WRONLY))
for _ in range(64):
    os.write(2, b"x" * 65536)
os.write(1, b"\nSURVIVED\n")
