# problem: sort
# expect: OK OK OK
input()
print(*sorted(map(int, input().split())))
