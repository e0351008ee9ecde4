/* Exact top-k by squared L2 distance, one pass over the vectors (retrieval/flatscan.py).

   One query against n row-major float32 vectors of d dims: each vector's distance is computed and
   compared with the k-th best so far in the same pass (a fused distance + top-k scan), so the
   vectors are read once and nothing of size n is written. FAISS's flat scan keeps a heap per query
   and costs 1.4-1.6x a plain pass over the array on one core (README, Performance); this is the
   pass itself plus a comparison, made for 8 rows at once (their 8 distances summed into one vector by
   shuffles and compared with the k-th best in one step). The GIL is released during the scan.

   top_k(x, q, k, out_dist, out_index): x a C-contiguous float32 buffer (n * d), q float32 (d),
   out_dist float32 (k), out_index int64 (k); rows past n are -1 with distance +inf. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

/* Insert (dist, idx) into the sorted best[0..k) (ascending), dropping the last. */
static void insert(float *best_d, int64_t *best_i, Py_ssize_t k, float dist, int64_t idx) {
    Py_ssize_t j = k - 1;
    while (j > 0 && best_d[j - 1] > dist) {
        best_d[j] = best_d[j - 1];
        best_i[j] = best_i[j - 1];
        j--;
    }
    best_d[j] = dist;
    best_i[j] = idx;
}

typedef int v8i __attribute__((vector_size(32)));
typedef long long v4l __attribute__((vector_size(32)));

/* A row's squared differences over its whole 8-float lanes, per lane (not summed). */
static inline v8 lanes(const float *row, const v8 *qv, Py_ssize_t d8) {
    v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
    for (Py_ssize_t j = 0; j < d8; j += 8) {
        v8 v;
        memcpy(&v, row + j, sizeof(v8));
        v8 t = v - qv[j / 8];
        acc += t * t;
    }
    return acc;
}

/* The squared distance of one row (its lanes, then the remainder one float at a time). */
static inline float row_dist(const float *row, const v8 *qv, const float *q, Py_ssize_t d8, Py_ssize_t d) {
    v8 acc = lanes(row, qv, d8);
    float dist = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (Py_ssize_t j = d8; j < d; j++) {
        float t = row[j] - q[j];
        dist += t * t;
    }
    return dist;
}

/* a[0..8) -> the vector of their 8 lane sums: a transpose by shuffles, 7 adds for 8 rows (a row's
   own horizontal sum costs as much for one row) */
static inline v8 lane_sums(const v8 *a) {
    const v8i even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 t[4], u[2];
    for (int r = 0; r < 4; r++)
        t[r] = __builtin_shuffle(a[2 * r], a[2 * r + 1], even) + __builtin_shuffle(a[2 * r], a[2 * r + 1], odd);
    for (int r = 0; r < 2; r++)
        u[r] = __builtin_shuffle(t[2 * r], t[2 * r + 1], lo2) + __builtin_shuffle(t[2 * r], t[2 * r + 1], hi2);
    return __builtin_shuffle(u[0], u[1], lo4) + __builtin_shuffle(u[0], u[1], hi4);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2,fma", "default")))
#endif
static void scan(const float *x, Py_ssize_t n, Py_ssize_t d, const float *q, Py_ssize_t k,
                 float *best_d, int64_t *best_i) {
    Py_ssize_t d8 = d / 8 * 8, rem = d - d8;
    v8 qv[65];  /* the query in 8-float lanes (d <= 512), its last lanes zero past d */
    memset(qv, 0, sizeof(qv));
    memcpy(qv, q, (size_t)d * sizeof(float));
    v8i keep = {0, 0, 0, 0, 0, 0, 0, 0};  /* the remainder's lanes < rem */
    for (Py_ssize_t j = 0; j < rem; j++) keep[j] = -1;
    float worst = best_d[k - 1];
    Py_ssize_t i = 0;
    /* 8 rows at a time: their distances summed into one vector and compared with the k-th best at
       once; a block with a row below it (rare once the k best are good) is inserted row by row. A
       row's remainder is read as a whole lane set (the next row's first floats masked off), so a
       block only runs while that read stays inside x; the last rows go one by one. Rows of whole
       lanes and rows shorter than one lane go by blocks; the others row by row, which measured
       faster for them (57 dims: 1.02x vs 1.09x the bandwidth bound; 32 dims by blocks: 1.11x vs
       1.40x; benchmarks/search_speed.py). */
    int blocks = rem == 0 || d8 == 0;
    for (; blocks && i + 8 <= n && (i + 8) * d + (rem ? 8 : 0) <= n * d; i += 8) {
        const float *rows = x + i * d;
        v8 acc[8];
        for (int r = 0; r < 8; r++) {
            const float *row = rows + r * d;
            v8 a = lanes(row, qv, d8);
            if (rem) {
                v8 v;
                memcpy(&v, row + d8, sizeof(v8));
                v8 t = (v8)((v8i)(v - qv[d8 / 8]) & keep);
                a += t * t;
            }
            acc[r] = a;
        }
        v8 dist = lane_sums(acc);
        v8 wv = {worst, worst, worst, worst, worst, worst, worst, worst};
        v4l below = (v4l)(dist < wv);
        if (below[0] | below[1] | below[2] | below[3]) {
            for (int r = 0; r < 8; r++) {
                if (dist[r] < worst) {
                    insert(best_d, best_i, k, dist[r], (int64_t)(i + r));
                    worst = best_d[k - 1];
                }
            }
        }
    }
    for (; i < n; i++) {
        float dist = row_dist(x + i * d, qv, q, d8, d);
        if (dist < worst) {
            insert(best_d, best_i, k, dist, (int64_t)i);
            worst = best_d[k - 1];
        }
    }
}

static int need(Py_buffer *b, Py_ssize_t min_bytes, const char *name) {
    if (b->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "top_k: %s is too short", name);
        return 0;
    }
    return 1;
}

static PyObject *top_k(PyObject *self, PyObject *args) {
    Py_buffer x, q, od, oi;
    Py_ssize_t k;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nw*w*", &x, &q, &k, &od, &oi)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t d = q.len / 4;
    if (k < 1 || d < 1 || d > 512) {
        PyErr_SetString(PyExc_ValueError, "top_k: k must be >= 1 and the query 1 to 512 floats");
    } else if (x.len % (4 * d) == 0 && need(&od, 4 * k, "out_dist") && need(&oi, 8 * k, "out_index")) {
        Py_ssize_t n = x.len / (4 * d);
        float *best_d = (float *)od.buf;
        int64_t *best_i = (int64_t *)oi.buf;
        for (Py_ssize_t j = 0; j < k; j++) {
            best_d[j] = INFINITY;
            best_i[j] = -1;
        }
        Py_BEGIN_ALLOW_THREADS
        scan((const float *)x.buf, n, d, (const float *)q.buf, k, best_d, best_i);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "top_k: x is not a whole number of vectors of the query's size");
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&q);
    PyBuffer_Release(&od);
    PyBuffer_Release(&oi);
    return result;
}

static PyMethodDef methods[] = {
    {"top_k", top_k, METH_VARARGS, "top_k(x, q, k, out_dist, out_index): exact top-k by squared L2"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flatscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__flatscan(void) { return PyModule_Create(&module); }
