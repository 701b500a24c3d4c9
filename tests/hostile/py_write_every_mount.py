# expect: OK
# output: SAFE
# Find every mount this process can see (the worker's scratch, its C++ cache, ...) and try to
# create, overwrite or delete files anywhere under them but the working directory.
import os

here = os.path.realpath(".")
mounts = {line.split()[4] for line in open("/proc/self/mountinfo")}
wrote = []
for mount in sorted(mounts, key=len, reverse=True):  # the specific mounts first
    for seen, (root, dirs, files) in enumerate(os.walk(mount)):
        if seen > 300 or root.startswith(("/proc", "/sys", "/dev")):
            dirs.clear()  # kernel interfaces, not storage; and a bound on the walk
            continue
        if os.path.realpath(root).startswith(here):
            continue
        try:
            with open(os.path.join(root, "rlef_pwned"), "x") as f:
                f.write("x")
            wrote.append(root)
        except OSError:
            pass
        for name in files[:3]:
            path = os.path.join(root, name)
            try:
                with open(path, "r+b") as f:
                    f.write(b"x")
                wrote.append(path)
            except OSError:
                pass
print("SAFE" if not wrote else f"LEAK {wrote[:5]}")
