# class: host
# expect: OK
# output: SAFE
# Read what the host holds: the installed package's bundled problems (whose outputs are the
# private tests'), a run directory's problems, the executor's logs and compile cache, another
# user's secret, /etc, /home, /root, /work, /proc, /sys. A test's tree holds none of it.
import os

PROBES = "@PROBES@"
read = []
for path in PROBES:
    try:
        if os.path.isdir(path):
            if os.listdir(path):
                read.append(path)
        else:
            with open(path, "rb") as f:
                if f.read(1):
                    read.append(path)
    except OSError:
        pass
print("SAFE" if not read else f"LEAK {read}")
