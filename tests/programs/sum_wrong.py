# problem: sum
# expect: WRONG_ANSWER WRONG_ANSWER WRONG_ANSWER
a, b = map(int, input().split())
print(a - b)
