// class: break
// expect: RUNTIME_ERROR
// A static binary that names a program interpreter (an .interp section): the kernel refuses to
// exec it before the point of no return, at the set-up step "exec". A failure there used to be
// the sandbox's own (SANDBOX_ERROR after two workers died on it): a reward-free way out of a
// wrong answer, and two worker restarts per job. The binary is the solution's: its verdict.
#include <cstdio>
__attribute__((section(".interp"), used)) static const char interp[] = "/nonexistent/ld.so";
int main() { puts("ran"); }
