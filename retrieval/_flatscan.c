/* Exact top-k by squared L2 distance, one pass over the vectors (retrieval/flatscan.py).

   One query against n row-major float32 vectors of d dims: each vector's distance is computed and
   compared with the k-th best so far in the same pass (a fused distance + top-k scan), so the
   vectors are read once and nothing of size n is written. FAISS's flat scan keeps a heap per query
   and costs 1.4-1.6x a plain pass over the array on one core (README, Performance); this is the
   pass itself plus a comparison. The GIL is released during the scan.

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2,fma", "default")))
#endif
static void scan(const float *x, Py_ssize_t n, Py_ssize_t d, const float *q, Py_ssize_t k,
                 float *best_d, int64_t *best_i) {
    Py_ssize_t d8 = d / 8 * 8;
    v8 qv[64];  /* the query in 8-float lanes, d <= 512 */
    for (Py_ssize_t j = 0; j < d8; j += 8) memcpy(&qv[j / 8], q + j, sizeof(v8));
    float worst = best_d[k - 1];
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *row = x + i * d;
        v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
        for (Py_ssize_t j = 0; j < d8; j += 8) {
            v8 v;
            memcpy(&v, row + j, sizeof(v8));
            v8 t = v - qv[j / 8];
            acc += t * t;
        }
        float dist = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (Py_ssize_t j = d8; j < d; j++) {
            float t = row[j] - q[j];
            dist += t * t;
        }
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
