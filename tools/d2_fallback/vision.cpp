// Minimal `detectron2._C` for the ap_loss_d2 PyPI fallback install of Detectron2.
//
// The `pb1-detectron2` sdist ships Detectron2 v0.6's Python sources without its C++/CUDA
// sources (detectron2/layers/csrc). ap_loss_d2's installer drops this file in as
// detectron2/layers/csrc/vision.cpp so that the unmodified setup.py builds a `_C` module.
// It exposes the version queries Detectron2 uses at import/collect_env time; every other
// attribute (deformable conv, rotated boxes/ROIAlign, the fast COCO evaluator) raises a
// NotImplementedError that says what to install. Plain CPython API: compiles in seconds.
#include <Python.h>

static PyObject* get_compiler_version(PyObject*, PyObject*) {
#if defined(__clang__)
  return PyUnicode_FromFormat("clang %d.%d", __clang_major__, __clang_minor__);
#elif defined(__GNUC__)
  return PyUnicode_FromFormat("GCC %d.%d", __GNUC__, __GNUC_MINOR__);
#else
  return PyUnicode_FromString("unknown");
#endif
}

static PyObject* get_cuda_version(PyObject*, PyObject*) {
  return PyUnicode_FromString("not available (ap_loss_d2 fallback build without C++/CUDA ops)");
}

static PyObject* has_cuda(PyObject*, PyObject*) { Py_RETURN_FALSE; }

static PyObject* module_getattr(PyObject*, PyObject* name) {
  if (!PyUnicode_Check(name)) {
    PyErr_SetString(PyExc_TypeError, "attribute name must be a string");
    return NULL;
  }
  const char* s = PyUnicode_AsUTF8(name);
  if (s == NULL) return NULL;
  if (s[0] == '_' && s[1] == '_') {  // dunder lookups keep normal module semantics
    PyErr_Format(PyExc_AttributeError, "module 'detectron2._C' has no attribute '%s'", s);
    return NULL;
  }
  PyErr_Format(
      PyExc_NotImplementedError,
      "detectron2._C.%s is a compiled Detectron2 operator, and this Detectron2 was installed "
      "by ap_loss_d2's PyPI fallback (pb1-detectron2 without C++/CUDA sources), which has no "
      "compiled operators (deformable conv, rotated boxes / ROIAlignRotated, fast COCO eval). "
      "Install Detectron2 from the official source to use it: "
      "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
      "(see README.md, 'Install').",
      s);
  return NULL;
}

static PyMethodDef methods[] = {
    {"get_compiler_version", get_compiler_version, METH_NOARGS, "Compiler used for this module."},
    {"get_cuda_version", get_cuda_version, METH_NOARGS, "CUDA version (none in this build)."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether CUDA ops were compiled (never, here)."},
    {"__getattr__", module_getattr, METH_O, "Explain that compiled ops are missing."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_C",
    "Detectron2 _C placeholder built by ap_loss_d2's PyPI fallback (no compiled ops).", -1,
    methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&moduledef);
  if (m == NULL) return NULL;
  if (PyModule_AddIntConstant(m, "AP_LOSS_D2_FALLBACK", 1) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
