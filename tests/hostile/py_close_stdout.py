# expect: WRONG_ANSWER
# output: 3
import os

os.close(1)
print(3)
