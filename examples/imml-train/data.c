#include "data.h"

#include "csv.h"
#include "rng.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void seterr(char *err, size_t n, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

static char *dup_str(const char *s) {
  const size_t len = strlen(s) + 1;
  char *d = malloc(len);
  if (d)
    memcpy(d, s, len);
  return d;
}

void raw_free(raw_data *rd) {
  if (!rd)
    return;
  for (int m = 0; m < IMML_MAX_MODALITIES; m++) {
    free(rd->x[m]);
    free(rd->path[m]);
    free(rd->header[m]);
  }
  free(rd->y);
  memset(rd, 0, sizeof *rd);
}

/* A label cell must hold a non-negative integer that fits an int. */
static int label_of(double v, int *out) {
  if (!(v >= 0.0) || v > (double)(INT_MAX / 2) || v != floor(v))
    return -1;
  *out = (int)v;
  return 0;
}

int raw_load(raw_data *rd, int m, char *const *paths, const int *dims,
             char *err, size_t n) {
  return raw_load_ex(rd, m, paths, dims, CSV_HEADER_AUTO, err, n);
}

int raw_load_ex(raw_data *rd, int m, char *const *paths, const int *dims,
                int header_mode, char *err, size_t n) {
  memset(rd, 0, sizeof *rd);
  if (m < 1 || m > IMML_MAX_MODALITIES) {
    seterr(err, n, "%d modality files given: need 1..%d", m,
           IMML_MAX_MODALITIES);
    return -1;
  }
  rd->m = m;
  int first_labelled = -1;
  int *line0 = NULL; /* source lines of the first labelled file */
  for (int i = 0; i < m; i++) {
    csv_table t;
    if (csv_read(paths[i], header_mode, dims == NULL, &t, err, n) != 0)
      goto fail;
    rd->path[i] = dup_str(paths[i]);
    rd->header[i] = t.header;
    rd->headerless[i] = t.header_guessed_absent;
    t.header = NULL;
    if (!rd->path[i]) {
      csv_free(&t);
      seterr(err, n, "out of memory");
      goto fail;
    }
    int has_label;
    if (!dims) {
      if (t.cols < 2) {
        seterr(err, n,
               "%s: %d column: need at least one feature column and the "
               "label column (last)",
               paths[i], t.cols);
        csv_free(&t);
        goto fail;
      }
      has_label = 1;
    } else if (t.cols == dims[i]) {
      has_label = 0;
    } else if (t.cols == dims[i] + 1) {
      has_label = 1;
    } else {
      seterr(err, n,
             "%s: %d columns, but the model's modality %d has %d features "
             "(expected %d columns, or %d with a label column)",
             paths[i], t.cols, i, dims[i], dims[i], dims[i] + 1);
      csv_free(&t);
      goto fail;
    }
    if (i > 0 && t.rows != rd->n) {
      seterr(err, n,
             "%s has %d data rows but %s has %d: every modality file needs "
             "one row per sample, in the same order",
             paths[i], t.rows, paths[0], rd->n);
      csv_free(&t);
      goto fail;
    }
    rd->n = t.rows;
    const int d = t.cols - has_label;
    rd->d[i] = d;
    rd->x[i] = malloc((size_t)t.rows * (size_t)d * sizeof(double));
    int *labels = has_label ? malloc((size_t)t.rows * sizeof(int)) : NULL;
    if (!rd->x[i] || (has_label && !labels)) {
      free(labels);
      csv_free(&t);
      seterr(err, n, "out of memory");
      goto fail;
    }
    for (int r = 0; r < t.rows; r++) {
      const double *row = t.data + (size_t)r * (size_t)t.cols;
      memcpy(rd->x[i] + (size_t)r * (size_t)d, row, (size_t)d * sizeof(double));
      if (!has_label)
        continue;
      if (label_of(row[d], &labels[r]) != 0) {
        seterr(err, n,
               "%s:%d:%d: label %.17g is not a class: the last column is the "
               "class label, an integer 0..C-1 (C classes)",
               paths[i], t.line[r], t.lastcol[r], row[d]);
        free(labels);
        csv_free(&t);
        goto fail;
      }
      if (first_labelled >= 0 && labels[r] != rd->y[r]) {
        seterr(err, n,
               "%s:%d: label %d differs from label %d of the same sample "
               "(data row %d) in %s:%d: the files must list the same "
               "samples in the same order",
               paths[i], t.line[r], labels[r], rd->y[r], r + 1,
               paths[first_labelled], line0[r]);
        free(labels);
        csv_free(&t);
        goto fail;
      }
    }
    if (has_label && first_labelled < 0) {
      first_labelled = i;
      rd->y = labels;
      line0 = t.line;
      t.line = NULL;
    } else {
      free(labels);
    }
    csv_free(&t);
  }
  free(line0);
  if (rd->y) {
    int mx = 0;
    for (int r = 0; r < rd->n; r++)
      if (rd->y[r] > mx)
        mx = rd->y[r];
    rd->c = mx + 1;
  }
  return 0;
fail:
  free(line0);
  raw_free(rd);
  return -1;
}

int check_classes(const int *y, int n, int c, const char *what, char *err,
                  size_t errsize) {
  if (c < 2) {
    seterr(err, errsize,
           "the %s hold a single class (label %d): classification needs at "
           "least two classes (labels 0..C-1)",
           what, c - 1);
    return -1;
  }
  if (c > n) {
    seterr(err, errsize,
           "largest label is %d but there are only %d %s: labels must be "
           "0..C-1 with every class present",
           c - 1, n, what);
    return -1;
  }
  int *count = calloc((size_t)c, sizeof(int));
  if (!count) {
    seterr(err, errsize, "out of memory");
    return -1;
  }
  for (int i = 0; i < n; i++)
    if (y[i] >= 0 && y[i] < c)
      count[y[i]]++;
  int missing = -1, present = 0;
  for (int k = 0; k < c; k++) {
    if (count[k] == 0 && missing < 0)
      missing = k;
    present += count[k] > 0;
  }
  free(count);
  if (present < 2) {
    seterr(err, errsize,
           "the %s hold a single class: classification needs at least two "
           "classes (labels 0..C-1)",
           what);
    return -1;
  }
  if (missing >= 0) {
    seterr(err, errsize,
           "class %d does not occur in the %s: labels must be 0..C-1 (C = "
           "largest label + 1 = %d) with every class present",
           missing, what, c);
    return -1;
  }
  return 0;
}

static int cmp_int(const void *a, const void *b) {
  const int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

int split_stratified(const int *y, int n, int c, double frac, uint64_t seed,
                     int **train, int *n_train, int **test, int *n_test,
                     char *err, size_t errsize) {
  return split_stratified_stream(y, n, c, frac, seed, 1, train, n_train, test,
                                 n_test, err, errsize);
}

int split_stratified_stream(const int *y, int n, int c, double frac,
                            uint64_t seed, uint64_t stream, int **train,
                            int *n_train, int **test, int *n_test, char *err,
                            size_t errsize) {
  *train = *test = NULL;
  *n_train = *n_test = 0;
  int *tr = malloc((size_t)n * sizeof(int));
  int *te = malloc((size_t)n * sizeof(int));
  int *cls = malloc((size_t)n * sizeof(int));
  if (!tr || !te || !cls) {
    free(tr);
    free(te);
    free(cls);
    seterr(err, errsize, "out of memory");
    return -1;
  }
  trng r;
  trng_seed(&r, seed, stream);
  int ntr = 0, nte = 0;
  for (int k = 0; k < c; k++) {
    int nc = 0;
    for (int i = 0; i < n; i++)
      if (y[i] == k)
        cls[nc++] = i;
    trng_shuffle(&r, cls, (size_t)nc);
    int nt = (int)floor((double)nc * frac + 0.5);
    if (nt > nc - 1)
      nt = nc - 1;
    if (nt < 0)
      nt = 0;
    for (int i = 0; i < nc; i++) {
      if (i < nt)
        te[nte++] = cls[i];
      else
        tr[ntr++] = cls[i];
    }
  }
  free(cls);
  qsort(tr, (size_t)ntr, sizeof(int), cmp_int);
  qsort(te, (size_t)nte, sizeof(int), cmp_int);
  *train = tr;
  *test = te;
  *n_train = ntr;
  *n_test = nte;
  return 0;
}

void stdz_free(stdz *s) {
  if (!s)
    return;
  for (int m = 0; m < IMML_MAX_MODALITIES; m++) {
    free(s->mean[m]);
    free(s->sd[m]);
  }
  memset(s, 0, sizeof *s);
}

int stdz_fit(stdz *s, const raw_data *rd, const int *rows, int nrows,
             int identity) {
  memset(s, 0, sizeof *s);
  s->m = rd->m;
  for (int m = 0; m < rd->m; m++) {
    const int d = rd->d[m];
    s->d[m] = d;
    s->mean[m] = calloc((size_t)d, sizeof(double));
    s->sd[m] = calloc((size_t)d, sizeof(double));
    if (!s->mean[m] || !s->sd[m]) {
      stdz_free(s);
      return -1;
    }
    double *mu = s->mean[m], *sd = s->sd[m];
    if (identity) {
      for (int j = 0; j < d; j++)
        sd[j] = 1.0;
      continue;
    }
    for (int i = 0; i < nrows; i++) {
      const double *x = rd->x[m] + (size_t)rows[i] * (size_t)d;
      for (int j = 0; j < d; j++)
        mu[j] += x[j];
    }
    for (int j = 0; j < d; j++)
      mu[j] /= (double)nrows;
    for (int i = 0; i < nrows; i++) {
      const double *x = rd->x[m] + (size_t)rows[i] * (size_t)d;
      for (int j = 0; j < d; j++)
        sd[j] += (x[j] - mu[j]) * (x[j] - mu[j]);
    }
    for (int j = 0; j < d; j++) {
      sd[j] = sqrt(sd[j] / (double)nrows);
      if (!(sd[j] > 0.0))
        sd[j] = 1.0;
    }
  }
  return 0;
}

void dataset_free(dataset *ds) {
  if (!ds)
    return;
  for (int m = 0; m < IMML_MAX_MODALITIES; m++)
    free(ds->x[m]);
  free(ds->y);
  memset(ds, 0, sizeof *ds);
}

int stdz_apply(const stdz *s, const raw_data *rd, const int *rows, int nrows,
               dataset *out) {
  memset(out, 0, sizeof *out);
  if (!rows)
    nrows = rd->n;
  out->m = rd->m;
  out->n = nrows;
  for (int m = 0; m < rd->m; m++) {
    const int d = rd->d[m];
    out->d[m] = d;
    out->x[m] = malloc((size_t)(nrows ? nrows : 1) * (size_t)d * sizeof(float));
    if (!out->x[m]) {
      dataset_free(out);
      return -1;
    }
    for (int i = 0; i < nrows; i++) {
      const int r = rows ? rows[i] : i;
      const double *x = rd->x[m] + (size_t)r * (size_t)d;
      float *o = out->x[m] + (size_t)i * (size_t)d;
      for (int j = 0; j < d; j++)
        o[j] = (float)((x[j] - s->mean[m][j]) / s->sd[m][j]);
    }
  }
  if (rd->y) {
    out->y = malloc((size_t)(nrows ? nrows : 1) * sizeof(int));
    if (!out->y) {
      dataset_free(out);
      return -1;
    }
    for (int i = 0; i < nrows; i++)
      out->y[i] = rd->y[rows ? rows[i] : i];
  }
  return 0;
}

/* Format: a first line "imml-train-stats 1", a line "modalities M", then per
 * modality "modality INDEX D", "mean" + D numbers, "std" + D numbers.
 * Written to PATH.tmp-PID (created 0666 & ~umask, like the library's
 * checkpoint), flushed to disk, then renamed over PATH. */
int stdz_save(const stdz *s, const char *path, char *err, size_t n) {
  const size_t plen = strlen(path);
  char *tmp = malloc(plen + 32);
  if (!tmp) {
    seterr(err, n, "%s: out of memory", path);
    return -1;
  }
  snprintf(tmp, plen + 32, "%s.tmp-%ld", path, (long)getpid());
  const int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
  if (!f) {
    seterr(err, n, "%s: cannot create: %s", tmp, strerror(errno));
    if (fd >= 0) {
      close(fd);
      unlink(tmp);
    }
    free(tmp);
    return -1;
  }
  fprintf(f, "imml-train-stats 1\nmodalities %d\n", s->m);
  for (int m = 0; m < s->m; m++) {
    fprintf(f, "modality %d %d\nmean", m, s->d[m]);
    for (int j = 0; j < s->d[m]; j++)
      fprintf(f, " %.17g", s->mean[m][j]);
    fprintf(f, "\nstd");
    for (int j = 0; j < s->d[m]; j++)
      fprintf(f, " %.17g", s->sd[m][j]);
    fprintf(f, "\n");
  }
  int bad = ferror(f) || fflush(f) != 0 || fsync(fileno(f)) != 0;
  const int saved = errno;
  if (fclose(f) != 0)
    bad = 1;
  if (bad) {
    seterr(err, n, "%s: write error: %s", tmp, strerror(saved));
  } else if (rename(tmp, path) != 0) {
    seterr(err, n, "renaming %s to %s: %s", tmp, path, strerror(errno));
    bad = 1;
  }
  if (bad)
    unlink(tmp);
  free(tmp);
  return bad ? -1 : 0;
}

/* Reads the next whitespace-separated token into buf. */
static int token(FILE *f, char *buf, size_t size) {
  return fscanf(f, "%63s", buf) == 1 && size >= 64 ? 0 : -1;
}

static int read_doubles(FILE *f, double *v, int d) {
  char tok[64];
  for (int j = 0; j < d; j++) {
    char *end;
    if (token(f, tok, sizeof tok) != 0)
      return -1;
    errno = 0;
    v[j] = strtod(tok, &end);
    if (*end != '\0' || !isfinite(v[j]))
      return -1;
  }
  return 0;
}

int stdz_load(stdz *s, const char *path, char *err, size_t n) {
  memset(s, 0, sizeof *s);
  FILE *f = fopen(path, "r");
  if (!f) {
    seterr(err, n,
           "%s: cannot open: %s (the standardisation statistics written "
           "next to the model by --save; use --stats FILE to name them)",
           path, strerror(errno));
    return -1;
  }
  char tok[64];
  int version = 0, m = 0;
  if (token(f, tok, sizeof tok) != 0 || strcmp(tok, "imml-train-stats") != 0 ||
      fscanf(f, "%d", &version) != 1 || version != 1 ||
      token(f, tok, sizeof tok) != 0 || strcmp(tok, "modalities") != 0 ||
      fscanf(f, "%d", &m) != 1 || m < 1 || m > IMML_MAX_MODALITIES)
    goto bad;
  s->m = m;
  for (int i = 0; i < m; i++) {
    int idx = -1, d = 0;
    if (token(f, tok, sizeof tok) != 0 || strcmp(tok, "modality") != 0 ||
        fscanf(f, "%d %d", &idx, &d) != 2 || idx != i || d < 1 || d > (1 << 24))
      goto bad;
    s->d[i] = d;
    s->mean[i] = malloc((size_t)d * sizeof(double));
    s->sd[i] = malloc((size_t)d * sizeof(double));
    if (!s->mean[i] || !s->sd[i])
      goto bad;
    if (token(f, tok, sizeof tok) != 0 || strcmp(tok, "mean") != 0 ||
        read_doubles(f, s->mean[i], d) != 0 || token(f, tok, sizeof tok) != 0 ||
        strcmp(tok, "std") != 0 || read_doubles(f, s->sd[i], d) != 0)
      goto bad;
    for (int j = 0; j < d; j++)
      if (!(s->sd[i][j] > 0.0))
        goto bad;
  }
  fclose(f);
  return 0;
bad:
  fclose(f);
  stdz_free(s);
  seterr(err, n, "%s: not a valid imml-train statistics file", path);
  return -1;
}

int write_rows(const raw_data *rd, int m, const int *rows, int nrows,
               const char *path, char *err, size_t n) {
  FILE *f = fopen(path, "w");
  if (!f) {
    seterr(err, n, "%s: cannot create: %s", path, strerror(errno));
    return -1;
  }
  const int d = rd->d[m];
  if (rd->header[m]) {
    fprintf(f, "%s\n", rd->header[m]);
  } else {
    for (int j = 0; j < d; j++)
      fprintf(f, "%d,", j);
    fprintf(f, "label\n");
  }
  for (int i = 0; i < nrows; i++) {
    const double *x = rd->x[m] + (size_t)rows[i] * (size_t)d;
    for (int j = 0; j < d; j++)
      fprintf(f, "%.17g,", x[j]);
    fprintf(f, "%d\n", rd->y[rows[i]]);
  }
  const int bad = ferror(f);
  if (fclose(f) != 0 || bad) {
    seterr(err, n, "%s: write error: %s", path, strerror(errno));
    return -1;
  }
  return 0;
}

void base_name(const char *path, char *out, size_t size) {
  const char *b = strrchr(path, '/');
  b = b ? b + 1 : path;
  size_t len = strlen(b);
  if (len > 4 && strcmp(b + len - 4, ".csv") == 0)
    len -= 4;
  snprintf(out, size, "%.*s", (int)len, b);
}
