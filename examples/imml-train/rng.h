/* The trainer's own deterministic generator (xoshiro256** seeded through
 * splitmix64), used for the train/test split, the per-epoch shuffles and the
 * corrupted-auxiliary permutations.  It is independent of the library's
 * parameter initialisation, so changing how the trainer draws never changes
 * a model's initial weights. */
#ifndef IMML_TRAIN_RNG_H
#define IMML_TRAIN_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct trng {
  uint64_t s[4];
} trng;

static inline uint64_t trng_splitmix(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Independent streams of one seed: the split, the shuffles and the
 * corruption permutations each take their own `stream` number. */
static inline void trng_seed(trng *r, uint64_t seed, uint64_t stream) {
  uint64_t x = seed ^ (stream * 0xD1B54A32D192ED03ull);
  for (int i = 0; i < 4; i++)
    r->s[i] = trng_splitmix(&x);
}

static inline uint64_t trng_rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

static inline uint64_t trng_next(trng *r) {
  uint64_t *s = r->s;
  const uint64_t out = trng_rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = trng_rotl(s[3], 45);
  return out;
}

/* Uniform integer in 0..n-1 (n >= 1), without modulo bias. */
static inline size_t trng_below(trng *r, size_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % (uint64_t)n;
  uint64_t x;
  do
    x = trng_next(r);
  while (x >= limit);
  return (size_t)(x % (uint64_t)n);
}

/* Fisher-Yates shuffle of idx[0..n-1]. */
static inline void trng_shuffle(trng *r, int *idx, size_t n) {
  for (size_t i = n; i > 1; i--) {
    const size_t j = trng_below(r, i);
    const int t = idx[i - 1];
    idx[i - 1] = idx[j];
    idx[j] = t;
  }
}

#endif
