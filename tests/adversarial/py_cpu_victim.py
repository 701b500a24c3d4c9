# class: exhaust
# expect: OK
# output: done
# 0.3 s of CPU: run on one worker while another worker's test spins 60 threads.
import time

start = time.process_time()
while time.process_time() - start < 0.3:
    pass
print("done")
