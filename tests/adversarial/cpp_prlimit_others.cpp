// class: privileges
// expect: OK
// output: SAFE
// prlimit64 on the worker and every other process (see py_prlimit_others.py), from C++.
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
int main() {
  rlimit zero{0, 0};
  int changed = 0;
  for (int pid = 1; pid < 64; pid++) {
    if (pid == getpid()) continue;
    changed += syscall(SYS_prlimit64, pid, RLIMIT_NOFILE, &zero, nullptr) == 0;
  }
  if (changed == 0) {
    puts("SAFE");
  } else {
    printf("LEAK %d\n", changed);
  }
}
