/* Multi-modal data sets for imml-train: one CSV per modality, the class label
 * in the last column; standardisation with training statistics; the seeded
 * stratified split. */
#ifndef IMML_TRAIN_DATA_H
#define IMML_TRAIN_DATA_H

#include "csv.h"

#include <imml.h>

#include <stddef.h>
#include <stdint.h>

/* Raw values as read, one matrix per modality, same rows in every file. */
typedef struct raw_data {
  int m;                             /* modalities */
  int n;                             /* rows (samples) */
  int c;                             /* classes (max label + 1), 0: no labels */
  int d[IMML_MAX_MODALITIES];        /* feature columns of each modality */
  double *x[IMML_MAX_MODALITIES];    /* n x d[m] */
  char *path[IMML_MAX_MODALITIES];   /* file names (copies) */
  char *header[IMML_MAX_MODALITIES]; /* the header line, or NULL (none) */
  /* 1: the file's first line was read as data because it looks like data
   * (csv_read's CSV_HEADER_AUTO rule); the caller warns */
  int headerless[IMML_MAX_MODALITIES];
  int *y; /* n labels, or NULL */
} raw_data;

/* Standardised float32 features ready for the library. */
typedef struct dataset {
  int m, n;
  int d[IMML_MAX_MODALITIES];
  float *x[IMML_MAX_MODALITIES]; /* n x d[m] */
  int *y;                        /* n labels, or NULL */
} dataset;

/* Per-column mean and standard deviation of the training rows. */
typedef struct stdz {
  int m;
  int d[IMML_MAX_MODALITIES];
  double *mean[IMML_MAX_MODALITIES];
  double *sd[IMML_MAX_MODALITIES]; /* population std; 0 is stored as 1 */
} stdz;

/*! raw_load_ex() : reads m CSV files, each with a header row or not as
 *  header_mode (a csv_header) says.  With dims NULL (training) the last
 *  column of every file is the label: an integer >= 0, the same in every
 *  file row by row.  With dims (prediction) file m must have dims[m]
 *  feature columns, plus optionally a label column; labels are kept when
 *  present.  rd->c is max label + 1 (classes are not checked here).
 *  @return 0, or -1 with a message in err. */
int raw_load_ex(raw_data *rd, int m, char *const *paths, const int *dims,
                int header_mode, char *err, size_t errsize);
/*! raw_load() : raw_load_ex() with the header row detected
 *  (CSV_HEADER_AUTO). */
int raw_load(raw_data *rd, int m, char *const *paths, const int *dims,
             char *err, size_t errsize);
void raw_free(raw_data *rd);

/*! check_classes() : every class 0..c-1 must occur in y[0..n-1] and c >= 2.
 *  `what` names the rows in the message ("training rows"). */
int check_classes(const int *y, int n, int c, const char *what, char *err,
                  size_t errsize);

/*! split_stratified() : per class, a seeded shuffle sends
 *  round(n_c * frac) rows to the test set, keeping at least one row of
 *  every class for training.  Both lists come back in file order.
 *  @return 0, or -1 (out of memory, or an empty training set). */
int split_stratified(const int *y, int n, int c, double frac, uint64_t seed,
                     int **train, int *n_train, int **test, int *n_test,
                     char *err, size_t errsize);
/*! split_stratified_stream() : split_stratified() drawing from the
 *  seed's generator stream `stream` (split_stratified() uses stream 1). */
int split_stratified_stream(const int *y, int n, int c, double frac,
                            uint64_t seed, uint64_t stream, int **train,
                            int *n_train, int **test, int *n_test, char *err,
                            size_t errsize);

/*! stdz_fit() : statistics of rows[0..nrows-1] of rd, computed in double
 *  (two passes).  A column with std 0 gets std 1.  identity: mean 0 and
 *  std 1 everywhere (features used as they are). */
int stdz_fit(stdz *s, const raw_data *rd, const int *rows, int nrows,
             int identity);
void stdz_free(stdz *s);

/*! stdz_apply() : out = (x - mean) / sd for rows[0..nrows-1] (rows NULL:
 *  all rows), as float32, with labels when rd has them. */
int stdz_apply(const stdz *s, const raw_data *rd, const int *rows, int nrows,
               dataset *out);
void dataset_free(dataset *ds);

/*! stdz_save() / stdz_load() : the text sidecar MODEL.stats (exact: every
 *  double is written with 17 significant digits).  stdz_save() writes a
 *  temporary file beside `path` and renames it over `path`, so the file
 *  is created with mode 0666 & ~umask, as imml_model_save() creates the
 *  model. */
int stdz_save(const stdz *s, const char *path, char *err, size_t errsize);
int stdz_load(stdz *s, const char *path, char *err, size_t errsize);

/*! write_rows() : writes rows[0..nrows-1] of modality m of rd as a CSV with
 *  the original header (or, for a file read without one, the column indices
 *  0..d-1 and "label") and the label column (values exact to the double
 *  parsed). */
int write_rows(const raw_data *rd, int m, const int *rows, int nrows,
               const char *path, char *err, size_t errsize);

/*! base_name() : "dir/mfeat-fac.csv" -> "mfeat-fac" into out. */
void base_name(const char *path, char *out, size_t size);

#endif
