// class: persist
// expect: OK
// output: CLEAN
// py_stdin_state.py from C++ (whose tests get standard input another way): leave state on the
// description, then look for what an earlier test left. Run with @MODE@ "leave", then "look".
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <unistd.h>
#include <cstdio>
#include <cstring>
int main() {
  const int kFlags = O_NONBLOCK | O_DIRECT | O_ASYNC;
  if (strcmp("@MODE@", "leave") == 0) {
    fcntl(0, F_SETFL, kFlags);
    fcntl(0, F_SETOWN, getpid());
    fcntl(0, F_SETSIG, 33);
    fcntl(0, F_SETLEASE, F_RDLCK);
    puts("CLEAN");
    return 0;
  }
  int flags = fcntl(0, F_GETFL) & kFlags, owner = fcntl(0, F_GETOWN), sig = fcntl(0, F_GETSIG);
  int lease = fcntl(0, F_GETLEASE);
  if (flags == 0 && owner == 0 && sig == 0 && lease == F_UNLCK) {
    puts("CLEAN");
  } else {
    printf("LEFT flags %#o owner %d signal %d lease %d\n", flags, owner, sig, lease);
  }
}
