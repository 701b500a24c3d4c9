# class: judge
# expect: WRONG_ANSWER
# A real for an integer answer: 1e12 is within 1e-5 (relative) of 1000000000001, and is wrong.
print("1e12")
