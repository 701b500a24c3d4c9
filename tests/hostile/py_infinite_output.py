# expect: OUTPUT_LIMIT
while True:
    print("spam" * 100)
