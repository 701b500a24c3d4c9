# class: persist
# expect: OK
# output: built
# A tree 1,500 directories deep in its working directory (/tmp), a file at every level: a
# recursive cleanup (shutil.rmtree) dies of RecursionError on it, and then files survive into
# later tests.
import os

for _ in range(1500):
    with open("f", "w") as f:
        f.write("left behind")
    os.mkdir("d")
    os.chdir("d")
print("built")
