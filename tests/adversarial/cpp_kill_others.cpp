// class: privileges
// expect: SANDBOX_VIOLATION
// Kill every other process of the namespace, the worker and the template included.
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
int main() {
  for (int pid = 2; pid < 200; pid++) {
    if (pid != getpid()) syscall(SYS_tgkill, pid, pid, SIGKILL);
  }
  for (int pid = 1; pid < 200; pid++) {
    if (pid != getpid()) kill(pid, SIGKILL);
  }
  puts("still here");
}
