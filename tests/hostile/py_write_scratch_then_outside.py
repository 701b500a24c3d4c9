# expect: RUNTIME_ERROR
# Writing in the scratch directory (/tmp) is allowed; escaping it by path is not.
import os

with open("local.txt", "w") as f:
    f.write("fine")
os.makedirs("../../../../../../etc/rlef_hostile_sentinel_dir")
