/* A strict reader for numeric CSV files: one header row, then one sample
 * per row, every cell a finite decimal number.  Errors name the file, the
 * line and the column. */
#ifndef IMML_TRAIN_CSV_H
#define IMML_TRAIN_CSV_H

#include <stddef.h>

typedef struct csv_table {
  int rows;     /* data rows (the header is not counted) */
  int cols;     /* cells per row, fixed by the header */
  double *data; /* rows x cols, row-major */
  int *line;    /* 1-based source line of every data row */
  int *lastcol; /* 1-based character column where each row's last cell
                   starts (for messages about the label cell) */
  char *header; /* the header line as read, without its line ending */
} csv_table;

/*! csv_read() : reads `path` into *t.  Blank lines are skipped; lines may
 *  end in LF or CRLF; cells may be padded with spaces or tabs.
 *  @return 0, or -1 with a message "PATH:LINE:COLUMN: ..." in err. */
int csv_read(const char *path, csv_table *t, char *err, size_t errsize);

/*! csv_free() : releases *t and zeroes it; a zeroed table is fine. */
void csv_free(csv_table *t);

#endif
