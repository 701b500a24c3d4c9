// expect: OUTPUT_LIMIT
#include <string>
#include <iostream>
int main() {
  std::string line(50000000, 'x');
  std::cout << line;
}
