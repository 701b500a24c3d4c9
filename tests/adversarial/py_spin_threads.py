# class: exhaust
# expect: TIME_LIMIT
# 60 threads spinning (8 MB of stack each: run it with memory to spare): they may take this
# worker's CPU, never another worker's test's.
import threading


def spin():
    while True:
        pass


for _ in range(60):
    threading.Thread(target=spin, daemon=True).start()
spin()
