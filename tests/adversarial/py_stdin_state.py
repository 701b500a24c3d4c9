# class: persist
# expect: OK
# output: CLEAN
# Standard input is a description of the worker's: what one test sets on it (flags, its owner
# and signal, a lease) must not be there for the next. Run with @MODE@ "leave", then "look".
import fcntl
import os

F_SETSIG, F_GETSIG = 10, 11
MODE = "@MODE@"
if MODE == "leave":
    for call in (
        lambda: fcntl.fcntl(0, fcntl.F_SETFL, os.O_NONBLOCK | os.O_DIRECT | os.O_ASYNC),
        lambda: fcntl.fcntl(0, fcntl.F_SETOWN, os.getpid()),
        lambda: fcntl.fcntl(0, F_SETSIG, 33),
        lambda: fcntl.fcntl(0, fcntl.F_SETLEASE, fcntl.F_RDLCK),
    ):
        try:
            call()
        except OSError:
            pass
    print("CLEAN")
else:
    seen = []
    flags = fcntl.fcntl(0, fcntl.F_GETFL) & (os.O_NONBLOCK | os.O_DIRECT | os.O_ASYNC)
    if flags:
        seen.append(f"flags {flags:#o}")
    if owner := fcntl.fcntl(0, fcntl.F_GETOWN):
        seen.append(f"owner {owner}")
    if sig := fcntl.fcntl(0, F_GETSIG):
        seen.append(f"signal {sig}")
    if (lease := fcntl.fcntl(0, fcntl.F_GETLEASE)) != fcntl.F_UNLCK:
        seen.append(f"lease {lease}")
    print("CLEAN" if not seen else f"LEFT {seen}")
