# class: exhaust
# expect: OK
# output: bounded
# Fills its working directory (/tmp): memory a test holds in files is outside its RLIMIT_AS,
# so /tmp has a size (64 MB by default), and files are wiped before the next test.

block = b"x" * (1 << 20)
written = 0
for i in range(1024):
    try:
        with open(f"fill{i}", "wb") as f:
            for _ in range(16):
                f.write(block)
                written += 1
    except OSError:
        break
print("bounded" if written <= 128 else f"UNBOUNDED {written} MB")
