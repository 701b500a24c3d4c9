# class: exhaust
# expect: OK
# output: bounded
# Exhausts the inodes of its working directory (/tmp): it must end (ENOSPC), at a bound, and
# cost the next test nothing.
import os

made = 0
try:
    while made < 200_000:
        os.mkdir(f"d{made}")
        made += 1
except OSError:
    pass
print("bounded" if made < 200_000 else f"UNBOUNDED {made}")
