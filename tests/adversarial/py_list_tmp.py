# class: persist
# expect: OK
# output: []
# What an earlier test left in the working directory (/tmp, the one writable place): nothing.
import os

print(sorted(os.listdir(".")))
