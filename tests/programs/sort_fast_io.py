# problem: sort
# expect: OK OK OK
import sys

data = sys.stdin.buffer.read().split()
sys.stdout.write(" ".join(map(str, sorted(map(int, data[1:])))) + "\n")
