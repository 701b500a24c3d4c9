# problem: sum
# expect: OK OK OK
a, b = map(int, input().split())
print(a + b)
