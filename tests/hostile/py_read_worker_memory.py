# expect: RUNTIME_ERROR
with open("/proc/1/mem", "rb") as f:
    f.read(16)
