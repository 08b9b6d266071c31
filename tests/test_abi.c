/*
 * The caller-struct rule of doc/ABI.md, on lib/config.c's imml_struct_in,
 * for the sizes no program of this release can produce: a struct from an
 * older 1.x header (smaller than this library's, at least the 1.0 fields)
 * takes the defaults for the fields it lacks.  The other directions (a 1.0
 * program, a program from a newer header) run as whole programs in
 * tests/abi/compat_1_0.c and compat_1_1.c.
 */
#include "check_main.h"
#include "common.h"

#include <stddef.h>

/* A library struct of a later release: 1.0 had a, b; 1.1 added c, c2; 1.2
 * d, d2.  Each release's struct ends at its last field (no tail padding),
 * as doc/ABI.md requires of the public ones. */
typedef struct later {
  size_t struct_size;
  int a, b;  /* 1.0 */
  int c, c2; /* 1.1 */
  int d, d2; /* 1.2 */
} later;

#define LATER_1_0 IMML_END_OF(later, b)
#define LATER_KNOWN IMML_END_OF(later, d2)

static void later_defaults(later *x) {
  memset(x, 0, sizeof *x);
  x->struct_size = sizeof *x;
  x->a = 1;
  x->b = 2;
  x->c = 3;
  x->c2 = 33;
  x->d = 4;
  x->d2 = 44;
}

START_TEST(test_older_struct_takes_defaults) {
  /* a 1.1 caller (fields a, b, c) against this "1.2" library */
  struct {
    size_t struct_size;
    int a, b, c, c2;
  } old = {0, 10, 20, 30, 31};
  old.struct_size = sizeof old;
  later dst;
  later_defaults(&dst);
  char err[256] = "";
  ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                  &old, "later", "later_init", err, sizeof err),
                   IMML_OK);
  ck_assert_int_eq(dst.a, 10);
  ck_assert_int_eq(dst.b, 20);
  ck_assert_int_eq(dst.c, 30);
  ck_assert_int_eq(dst.c2, 31);
  ck_assert_int_eq(dst.d, 4); /* the defaults of the fields it lacks */
  ck_assert_int_eq(dst.d2, 44);
  ck_assert_uint_eq(dst.struct_size, sizeof dst);

  /* a 1.0 caller: c and d take their defaults */
  struct {
    size_t struct_size;
    int a, b;
  } v10 = {0, 11, 21};
  v10.struct_size = sizeof v10;
  later_defaults(&dst);
  ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                  &v10, "later", "later_init", err, sizeof err),
                   IMML_OK);
  ck_assert_int_eq(dst.a, 11);
  ck_assert_int_eq(dst.b, 21);
  ck_assert_int_eq(dst.c, 3);
  ck_assert_int_eq(dst.d2, 44);
}
END_TEST

START_TEST(test_smaller_than_1_0_refused) {
  struct {
    size_t struct_size;
    int a;
  } tiny = {0, 5};
  tiny.struct_size = IMML_END_OF(later, a); /* ends before b: not 1.0 */
  later dst;
  later_defaults(&dst);
  char err[256] = "";
  ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                  &tiny, "later", "later_init", err,
                                  sizeof err),
                   IMML_ERR_INVALID_ARG);
  ck_assert_ptr_nonnull(strstr(err, "later.struct_size"));
  ck_assert_int_eq(dst.a, 1); /* nothing copied */
}
END_TEST

START_TEST(test_newer_struct_zero_tail_only) {
  struct {
    later known;
    int e; /* 1.3 */
    char pad[20];
  } newer;
  memset(&newer, 0, sizeof newer);
  later_defaults(&newer.known);
  newer.known.struct_size = sizeof newer;
  newer.known.a = 7;
  later dst;
  later_defaults(&dst);
  char err[256] = "";
  ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                  &newer, "later", "later_init", err,
                                  sizeof err),
                   IMML_OK);
  ck_assert_int_eq(dst.a, 7);
  /* every unknown byte, one at a time, is refused and named */
  for (size_t i = LATER_KNOWN; i < sizeof newer; i++) {
    unsigned char *p = (unsigned char *)&newer;
    const unsigned char keep = p[i];
    p[i] = 0x5a;
    later_defaults(&dst);
    ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                    &newer, "later", "later_init", err,
                                    sizeof err),
                     IMML_ERR_UNKNOWN_FIELD);
    char want[32];
    snprintf(want, sizeof want, "byte %zu is 0x5a", i);
    ck_assert_msg(strstr(err, want), "message '%s' lacks '%s'", err, want);
    ck_assert_int_eq(dst.a, 1); /* nothing copied */
    p[i] = keep;
  }
}
END_TEST

START_TEST(test_absurd_struct_size_refused) {
  later src;
  later_defaults(&src);
  src.struct_size = (size_t)1 << 40; /* an uninitialised field, not a size */
  later dst;
  later_defaults(&dst);
  char err[256] = "";
  ck_assert_int_eq(imml_struct_in(&dst, sizeof dst, LATER_KNOWN, LATER_1_0,
                                  &src, "later", "later_init", err, sizeof err),
                   IMML_ERR_INVALID_ARG);
  ck_assert_ptr_nonnull(strstr(err, "not a struct size"));
}
END_TEST

/* The 1.0 minimum of every public struct is the end of its last field, so
 * a 1.0 program's sizeof always passes, padding included. */
START_TEST(test_public_minimums) {
  ck_assert_uint_le(IMML_CONFIG_SIZE_1_0, sizeof(imml_config));
  ck_assert_uint_le(IMML_FT_OPS_SIZE_1_0, sizeof(imml_ft_ops));
  ck_assert_uint_le(IMML_OPTIM_CONFIG_SIZE_1_0, sizeof(imml_optim_config));
  ck_assert_uint_le(IMML_LOAD_OPTIONS_SIZE_1_0, sizeof(imml_load_options));
  ck_assert_uint_le(IMML_COLLECTIVE_SIZE_1_0, sizeof(imml_collective));
#if SIZE_MAX > 0xffffffffu
  /* no tail padding a newer field could land in (doc/ABI.md) */
  ck_assert_uint_eq(IMML_OPTIM_CONFIG_SIZE_KNOWN, sizeof(imml_optim_config));
  ck_assert_uint_eq(IMML_CONFIG_SIZE_KNOWN, sizeof(imml_config));
#endif
}
END_TEST

int main(void) {
  Suite *s = suite_create("abi");
  TCase *tc = tcase_create("struct_in");
  tcase_add_test(tc, test_older_struct_takes_defaults);
  tcase_add_test(tc, test_smaller_than_1_0_refused);
  tcase_add_test(tc, test_newer_struct_zero_tail_only);
  tcase_add_test(tc, test_absurd_struct_size_refused);
  tcase_add_test(tc, test_public_minimums);
  suite_add_tcase(s, tc);
  return imml_run_suite(s);
}
