// expect: SANDBOX_VIOLATION
#include <sys/ptrace.h>
int main() { return ptrace(PTRACE_ATTACH, 1, nullptr, nullptr); }
