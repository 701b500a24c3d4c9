// problem: sum
// expect: COMPILE_ERROR COMPILE_ERROR COMPILE_ERROR
int main() { return undefined_name; }
