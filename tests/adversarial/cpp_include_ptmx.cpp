// class: exhaust
// expect: COMPILE_ERROR
// The compiler opens the pseudo-terminal multiplexer (and reads from it forever).
#include "/dev/ptmx"
int main() {}
