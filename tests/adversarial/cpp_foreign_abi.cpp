// class: signals
// expect: SANDBOX_VIOLATION
// The filters are x86-64's: a 32-bit system call (int 0x80: i386's kill(1, SIGKILL)) must not
// slip past them (seccomp sees another architecture), from a thread so that only the whole
// process's death counts; nor must an x32 one (tested first: a kernel without x32 would answer
// ENOSYS, the filter must not let it get that far).
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <csignal>
#include <cstdio>
static void* i386_kill(void*) {
  long r;
  asm volatile("int $0x80" : "=a"(r) : "a"(37L), "b"(1L), "c"(9L) : "memory");
  printf("int 0x80 returned %ld\n", r);
  return nullptr;
}
int main() {
#if defined(__x86_64__)
  long x32 = syscall(0x40000000L | SYS_getpid);
  printf("x32 getpid returned %ld\n", x32);
  pthread_t t;
  pthread_create(&t, nullptr, i386_kill, nullptr);
  pthread_join(t, nullptr);
  puts("ESCAPED");
#else
  raise(SIGSYS);  // no such ABI elsewhere: the verdict the filter gives
#endif
}
