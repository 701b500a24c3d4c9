# expect: OK
# stdin-mb: 64
# output: 67108864
import sys

print(len(sys.stdin.buffer.read()))
