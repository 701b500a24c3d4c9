// expect: SANDBOX_VIOLATION
// Re-exec'ing its own binary (same path string, new pointer) is still an exec after the first.
#include <unistd.h>
int main(int, char** argv) {
  execl("/proc/self/exe", argv[0], nullptr);
  return 0;
}
