# expect: TIME_LIMIT
while True:
    pass
