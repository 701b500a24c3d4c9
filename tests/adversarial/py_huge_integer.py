# class: judge
# expect: WRONG_ANSWER
# An integer of 5,000 digits where an integer is expected: int() refuses more than 4,300, and a
# judge that raised left this job's reports unread on the worker's channel, for the next job
# to be judged with.
print("7" * 5000)
