# problem: sum
# expect: COMPILE_ERROR COMPILE_ERROR COMPILE_ERROR
def f(:
    pass
