# problem: sum first
# expect: OK
print(3)
exit()
print(4)
