# expect: OK
# output: SAFE
# Only the sandbox's own PID namespace is visible: no trainer, no other worker.
import os

pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("SAFE" if len(pids) <= 3 else f"LEAK {len(pids)}")
