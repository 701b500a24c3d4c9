// expect: SANDBOX_VIOLATION
#include <unistd.h>
int main() {
  execl("/bin/sh", "sh", "-c", "echo pwned > /tmp/rlef_hostile_sentinel", nullptr);
  return 0;
}
