// class: exhaust
// expect: COMPILE_ERROR
// The compiler reads a device: /dev/zero never ends (a 30 s hang, or gigabytes of memory).
#include "/dev/zero"
int main() {}
