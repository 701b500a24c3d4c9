// Shared declarations of the executor extension (rlef_hpc.sandbox._executor).
#pragma once

#include <linux/filter.h>

struct Policy {
  bool allow_subprocesses;
  // Address of the only path a native test may exec; nullptr forbids exec (Python tests).
  const char* exec_path;
};

// Builds the seccomp filter for `policy` and exports it as BPF (owned by the caller).
// Returns 0 or a negative errno.
int export_policy(const Policy& policy, sock_fprog* out);
