// class: host
// expect: COMPILE_ERROR
// The compiler reads a host file and quotes it in its error message, which becomes the
// model's feedback: the bundled problems, with their outputs.
#include "@BUNDLED@"
int main() {}
