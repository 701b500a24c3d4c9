// problem: sum first
// expect: RUNTIME_ERROR
int main() { return 3; }
