# class: privileges
# expect: OK
# output: SAFE
# Who the test is: never root, never the executor's own uid, without any capability (a file of
# its own with mode 000 stays unreadable: no CAP_DAC_OVERRIDE), and it cannot become anyone.
import os

EXECUTOR_UID = "@EXECUTOR_UID@"
found = []
if os.getuid() in (0, EXECUTOR_UID) or os.geteuid() in (0, EXECUTOR_UID):
    found.append(f"uid {os.getuid()}")
fd = os.open("mode000", os.O_CREAT | os.O_WRONLY, 0)  # in its working directory
os.write(fd, b"x")
os.close(fd)
try:
    with open("mode000", "rb") as f:
        f.read()
    found.append("read a mode-000 file: CAP_DAC_OVERRIDE")
except PermissionError:
    pass
for become in (os.setuid, os.setgid):
    try:
        become(0)
        found.append(f"{become.__name__}(0)")
    except PermissionError:
        pass
print("SAFE" if not found else f"LEAK {found}")
