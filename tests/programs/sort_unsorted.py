# problem: sort
# expect: WRONG_ANSWER OK WRONG_ANSWER
input()
print(input())
