// problem: sum
// expect: OK OK WRONG_ANSWER
#include <cstdio>
int main() {
  int a, b;  // too narrow for the third test
  scanf("%d %d", &a, &b);
  printf("%d\n", a + b);
}
