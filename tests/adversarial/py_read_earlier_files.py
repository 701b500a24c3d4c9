# class: earlier
# expect: OK
# output: SAFE
# An earlier job on this worker left a token in files (its /tmp, its working directory) and in
# its compiled binary. Walk everything visible and look for the token in every file.
import os
import time

TOKEN = b"@TOKEN@"
hits = []
deadline = time.monotonic() + 5
walks = [os.walk(root) for root in [*"@PROBES@", "/"]]  # where a worker keeps things, first
for d, _, files in (entry for walk in walks for entry in walk):
    if time.monotonic() > deadline:
        break
    if d.startswith(("/dev", "/proc", "/sys")):
        continue
    for name in files:
        path = os.path.join(d, name)
        try:
            with open(path, "rb") as f:
                if TOKEN in f.read(64 << 20):
                    hits.append(path)
        except OSError:
            pass
print("SAFE" if not hits else f"LEAK {hits}")
