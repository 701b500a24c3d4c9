# expect: TIME_LIMIT
# A SIGALRM-style timeout raised inside the program would be swallowed here.
while True:
    try:
        while True:
            pass
    except BaseException:
        pass
