# expect: RUNTIME_ERROR
with open("/tmp/rlef_hostile_target", "w") as f:
    f.write("pwned")
with open("/tmp/rlef_hostile_sentinel", "w") as f:
    f.write("pwned")
