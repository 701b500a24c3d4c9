# class: exhaust
# expect: OK
# output: bounded
# Exhausts /tmp's inodes: it must end (ENOSPC), at a bound, and cost the next test nothing.
import os

os.chdir("/tmp")
made = 0
try:
    while made < 200_000:
        os.mkdir(f"d{made}")
        made += 1
except OSError:
    pass
print("bounded" if made < 200_000 else f"UNBOUNDED {made}")
