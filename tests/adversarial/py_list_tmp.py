# class: persist
# expect: OK
# output: []
# What an earlier test left in /tmp and in the working directory: nothing.
import os

print(sorted(set(os.listdir("/tmp")) | set(os.listdir("."))))
