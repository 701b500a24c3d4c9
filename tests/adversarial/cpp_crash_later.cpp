// class: host
// expect: RUNTIME_ERROR
// py_crash_later.py from C++, where exec makes a process dumpable again, whatever it was before
// (unless it cannot read the binary it runs: it says whether it can).
#include <fcntl.h>
#include <unistd.h>
#include <cstdio>
int main() {
  if (open("/solution/prog", O_RDONLY) >= 0) puts("its binary is readable");
  fflush(stdout);
  usleep(1500000);
  volatile int* nowhere = nullptr;
  return *nowhere;
}
