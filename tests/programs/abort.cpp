// problem: sum first
// expect: RUNTIME_ERROR
#include <cstdlib>
int main() { abort(); }
