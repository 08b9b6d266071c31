/* --compare: five methods trained on the same seeded splits. */
#ifndef IMML_TRAIN_COMPARE_H
#define IMML_TRAIN_COMPARE_H

#include "data.h"
#include "train.h"

/*! run_compare() : for seeds o->seed .. o->seed + seeds - 1, splits rd
 *  (stratified, test_fraction), standardises with the training rows and
 *  trains (1) unimodal, (2) late fusion, (3) late fusion + unimodal heads,
 *  (4) IMML conditional, (5) IMML strict; prints the table on stdout.
 *  @return 0, or 1 after printing an error. */
int run_compare(const train_opts *o, const raw_data *rd, int seeds,
                double test_fraction);

#endif
