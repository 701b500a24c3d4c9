// class: terminal
// expect: OK
// output: SAFE
// The operator's terminal, from C++ (see py_terminal.py): the raw ioctl takes the request's
// high bits, which only an allow-list of full 64-bit requests stops.
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>
#include <cstdio>
#include <string>

int main() {
  std::string reached;
  int fds[8] = {0, 1, 2};
  int n = 3;
  for (const char* path : {"/dev/tty", "/dev/ptmx", "/dev/console"}) {
    int fd = open(path, O_RDWR | O_NOCTTY);
    if (fd >= 0) {
      fds[n++] = fd;
      reached += std::string("open ") + path + " ";
    }
  }
  char c = 'i';
  for (int i = 0; i < n; i++) {
    for (unsigned long request : {0x5412UL, 0x5412UL | (1UL << 32), 0x540EUL}) {
      long rc = syscall(SYS_ioctl, fds[i], request, &c);
      if (rc == 0 || errno != EPERM) reached += "ioctl " + std::to_string(request) + " ";
    }
  }
  if (getsid(0) != getpid()) reached += "not-a-session-leader";
  if (reached.empty()) {
    puts("SAFE");
  } else {
    printf("LEAK %s\n", reached.c_str());
  }
}
