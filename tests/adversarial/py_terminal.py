# class: terminal
# expect: OK
# output: SAFE
# The operator's terminal: open it, push keystrokes into its input (TIOCSTI: a command run in
# the operator's shell), take its foreground group, switch off echo. Every ioctl but a few
# harmless ones must fail (high bits set too: the kernel truncates the request to 32 bits), and
# the test must be alone in a session of its own, without a controlling terminal.
import fcntl
import os
import struct
import termios

TIOCSTI, TIOCSCTTY, TIOCSPGRP = 0x5412, 0x540E, 0x5410
reached = []
fds = [0, 1, 2]
for path in ("/dev/tty", "/dev/ptmx", "/dev/console", "/dev/pts/0", "/dev/tty0"):
    try:
        fds.append(os.open(path, os.O_RDWR | os.O_NOCTTY))
        reached.append(f"open {path}")
    except OSError:
        pass
for fd in fds:
    for request, arg in (
        (TIOCSTI, b"i"),
        (TIOCSTI | (1 << 32), b"i"),
        (TIOCSCTTY, 0),
        (TIOCSPGRP, struct.pack("i", os.getpid())),
        (termios.TCSETS, bytes(60)),
    ):
        try:
            fcntl.ioctl(fd, request, arg)
            reached.append(f"ioctl {request:#x} on {fd}")
        except OverflowError:
            pass  # Python refuses the high bits itself
        except OSError as e:
            if e.errno != 1:  # EPERM: the sandbox's answer; ENOTTY would mean the call ran
                reached.append(f"ioctl {request:#x} on {fd}: {e.strerror}")
if os.getsid(0) != os.getpid():
    reached.append("not a session leader")
print("SAFE" if not reached else f"LEAK {reached}")
