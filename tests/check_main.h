/* Shared runner for the Check suites: TAP on stdout (meson's 'tap'
 * protocol), non-zero exit on any failure. */
#ifndef IMML_CHECK_MAIN_H
#define IMML_CHECK_MAIN_H

#include <check.h>
#include <stdlib.h>

static inline int imml_run_suite(Suite *s) {
  SRunner *sr = srunner_create(s);
  srunner_set_tap(sr, "-");
  srunner_run_all(sr, CK_SILENT);
  const int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif
