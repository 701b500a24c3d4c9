# expect: OK
# output: SAFE
# Walk everything this process can see (its tree: the standard library, /dev, /etc, /solution)
# and try to create, overwrite or delete files anywhere but the working directory.
import os

here = os.path.realpath(".")
wrote = []
for seen, (root, _dirs, files) in enumerate(os.walk("/")):
    if seen > 3000:
        break
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
        if path.startswith("/dev/"):
            continue  # null, zero, full: writable devices, not storage
        try:
            with open(path, "r+b") as f:
                f.write(b"x")
            wrote.append(path)
        except OSError:
            pass
print("SAFE" if not wrote else f"LEAK {wrote[:5]}")
