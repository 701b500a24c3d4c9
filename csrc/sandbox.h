// Shared declarations of the executor extension (rlef_hpc.sandbox._executor).
#pragma once

#include <linux/filter.h>
#include <sys/types.h>

struct Policy {
  bool allow_subprocesses;
  // Address of the only path a native test may exec; nullptr forbids exec (Python tests).
  const char* exec_path;
};

// Builds the seccomp filter for `policy` and exports it as BPF (owned by the caller).
// Returns 0 or a negative errno.
int export_policy(const Policy& policy, sock_fprog* out);

// The second, per-test filter: signals (kill, tgkill) and prlimit64 only on the test itself,
// `self` being its pid as it sees it. Written into `filter` (kSelfFilterLen instructions), no
// allocation: it is built in the test's own process, possibly a vfork child.
constexpr int kSelfFilterLen = 21;
void self_filter(pid_t self, sock_filter* filter, sock_fprog* out);
