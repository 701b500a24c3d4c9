# problem: mean
# expect: WRONG_ANSWER OK
n = int(input())
xs = list(map(float, input().split()))
print(round(sum(xs) / n, 2))
