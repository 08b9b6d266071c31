/* splitmix64-seeded xoshiro256** and the uniform initialiser of
 * METHOD.md section 6.  The same seed gives the same values everywhere:
 * only integer arithmetic and one correctly rounded division. */
#include "internal.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void imml_rng_seed(imml_rng *r, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < 4; i++)
    r->s[i] = splitmix64(&x);
}

uint64_t imml_rng_next(imml_rng *r) {
  uint64_t *s = r->s;
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

void imml_rng_uniform_init(imml_rng *r, float *x, size_t n, int n_in) {
  /* u = (x >> 40) 2^-24 is exact in double; (2u - 1) / sqrt(n_in) is
   * evaluated in double and rounded once to float. */
  const double root = sqrt((double)n_in);
  for (size_t i = 0; i < n; i++) {
    const double u = (double)(imml_rng_next(r) >> 40) * 0x1.0p-24;
    x[i] = (float)((2.0 * u - 1.0) / root);
  }
}
