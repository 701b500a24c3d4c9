# expect: RUNTIME_ERROR
# Writes outside /tmp, the only writable directory of a test's tree.
with open("/rlef_hostile_sentinel", "w") as f:
    f.write("pwned")
with open("/etc/passwd", "a") as f:
    f.write("pwned")
