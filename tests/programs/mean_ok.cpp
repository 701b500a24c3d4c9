// problem: mean
// expect: OK OK
#include <cstdio>
int main() {
  int n;
  scanf("%d", &n);
  double sum = 0, x;
  for (int i = 0; i < n; i++) {
    scanf("%lf", &x);
    sum += x;
  }
  printf("%.9f\n", sum / n);
}
