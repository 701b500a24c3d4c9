// class: exhaust
// expect: OK
// A program with a 15 MiB initialised table (a binary of 15 MiB, within every limit): each
// distinct one used to be copied into the worker's scratch (16 kept, 256 MiB in all, shared with
// the compiler's working space), so that after a dozen the next compile failed for want of
// space, and that COMPILE_ERROR was cached for good under the source's hash.
#include <cstdio>
static const char table[15 << 20] = {"@SEED@"};
int main(int argc, char**) { printf("%d\n", table[argc - 1] != 0); }
