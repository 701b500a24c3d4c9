# expect: SANDBOX_VIOLATION
import os

while True:
    os.fork()
