# expect: OK
# stdin-mb: 64
# output: 3
print(3)
