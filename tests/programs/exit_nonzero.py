# problem: sum first
# expect: RUNTIME_ERROR
import sys

print(3)
sys.exit(2)
