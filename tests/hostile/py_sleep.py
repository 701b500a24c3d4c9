# expect: TIME_LIMIT
import time

time.sleep(1000)
