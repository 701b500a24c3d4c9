# expect: OK
# output: SAFE
# No process outside the test may be visible: a test's tree has no /proc at all (and if it had
# one, it would show the sandbox's own PID namespace only: no trainer, no other worker).
import os

try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
except FileNotFoundError:
    pids = []
print("SAFE" if len(pids) <= 3 else f"LEAK {len(pids)}")
