# problem: sum first
# expect: TIME_LIMIT
while True:
    pass
