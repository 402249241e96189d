// Python bindings of mmcore._C for what is not a tensor op. Tensor ops are registered with the dispatcher
// (TORCH_LIBRARY_IMPL) in their own files and reached through torch.ops.mmcore.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/packing.h"
#include "grounding/entities.h"

namespace mmcore::decoding {
bool int8_dot_fast();  // csrc/decoding/logits_int8.cpp
}

namespace py = pybind11;
using mmcore::grounding::Extraction;

namespace {

template <typename CharT>
void widen(const void* data, Py_ssize_t n, char32_t* out) {
  const CharT* src = static_cast<const CharT*>(data);
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = src[i];
}

// Copies the str's code points as stored (lone surrogates included), never through UTF-8; one typed loop
// per storage kind instead of PyUnicode_READ's per-character switch.
void read_code_points(PyObject* s, char32_t* out) {
  const Py_ssize_t n = PyUnicode_GET_LENGTH(s);
  const void* data = PyUnicode_DATA(s);
  switch (PyUnicode_KIND(s)) {
    case PyUnicode_1BYTE_KIND:
      widen<Py_UCS1>(data, n, out);
      break;
    case PyUnicode_2BYTE_KIND:
      widen<Py_UCS2>(data, n, out);
      break;
    default:
      widen<Py_UCS4>(data, n, out);
  }
}

// NOTE: results are built with the CPython API directly: a string of Kosmos-2 output carries ~8 entities and
// ~70 Python objects, and pybind11's casting wrappers cost more than the parse itself.
PyObject* checked(PyObject* o) {
  if (!o) throw py::error_already_set();
  return o;
}

PyObject* tuple_of(std::initializer_list<PyObject*> items) {
  PyObject* t = checked(PyTuple_New(static_cast<Py_ssize_t>(items.size())));
  Py_ssize_t i = 0;
  for (PyObject* item : items) PyTuple_SET_ITEM(t, i++, item);  // steals each reference
  return t;
}

// Python floats of the grid's coordinates, made once per call: a box coordinate is one of i * c (top-left,
// edges), i * c + c (bottom-right, edges) or i * c + c / 2 (centres), for i < num_bins, and building those
// objects once saves four float allocations per box. Values come from cell_pair_to_box itself, so they are
// bit-identical to an uncached conversion; coordinates of indices outside the grid are not cached.
class GridFloats {
 public:
  explicit GridFloats(int64_t num_bins) : n_(num_bins <= kMaxCached ? num_bins : 0), cache_(3 * n_, nullptr) {}
  ~GridFloats() {
    for (PyObject* o : cache_) Py_XDECREF(o);
  }
  GridFloats(const GridFloats&) = delete;
  GridFloats& operator=(const GridFloats&) = delete;

  // A new reference to the float `value`, which the decoder computed for grid line `i` of kind `slot`.
  PyObject* get(int slot, int64_t i, double value) {
    if (i < 0 || i >= n_) return checked(PyFloat_FromDouble(value));
    PyObject*& o = cache_[static_cast<size_t>(slot * n_ + i)];
    if (!o) o = checked(PyFloat_FromDouble(value));
    Py_INCREF(o);
    return o;
  }

 private:
  static constexpr int64_t kMaxCached = 4096;
  int64_t n_;
  std::vector<PyObject*> cache_;
};

// Python ints for span offsets, made once per call for offsets below kMax (CPython itself caches only up
// to 256; grounded captions are a few hundred characters long).
class SmallInts {
 public:
  SmallInts() : cache_(kMax, nullptr) {}
  ~SmallInts() {
    for (PyObject* o : cache_) Py_XDECREF(o);
  }
  SmallInts(const SmallInts&) = delete;
  SmallInts& operator=(const SmallInts&) = delete;

  PyObject* get(int64_t v) {  // a new reference
    if (v < 0 || v >= kMax) return checked(PyLong_FromLongLong(v));
    PyObject*& o = cache_[static_cast<size_t>(v)];
    if (!o) o = checked(PyLong_FromLongLong(v));
    Py_INCREF(o);
    return o;
  }

 private:
  static constexpr int64_t kMax = 4096;
  std::vector<PyObject*> cache_;
};

PyObject* box_tuple(const mmcore::grounding::Box& b, std::pair<int64_t, int64_t> cells, int64_t num_bins,
                    GridFloats& grid) {
  const int64_t ul = cells.first, lr = cells.second;
  const int64_t ux = ul % num_bins, uy = ul / num_bins, lx = lr % num_bins, ly = lr / num_bins;
  const bool edges = ul == lr || ux == lx || uy == ly;  // the decoder's own case split
  const int lo = edges ? 0 : 2, hi = edges ? 1 : 2;
  return tuple_of({grid.get(lo, ux, b.x1), grid.get(lo, uy, b.y1), grid.get(hi, lx, b.x2), grid.get(hi, ly, b.y2)});
}

py::object to_python(const Extraction& ex, PyObject* text, int64_t num_bins, GridFloats& grid, SmallInts& ints) {
  py::object clean = py::reinterpret_steal<py::object>(
      checked(PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, ex.clean_text.data(), ex.clean_text.size())));
  py::object entities = py::reinterpret_steal<py::object>(checked(PyList_New(ex.entities.size())));
  for (size_t k = 0; k < ex.entities.size(); ++k) {
    const auto& e = ex.entities[k];
    PyObject* name = checked(e.has_phrase ? PyUnicode_Substring(text, static_cast<Py_ssize_t>(e.name_begin),
                                                                static_cast<Py_ssize_t>(e.name_end))
                                          : PyUnicode_FromFormat("<patch_index_%lld><patch_index_%lld>",
                                                                 static_cast<long long>(e.ul),
                                                                 static_cast<long long>(e.lr)));
    PyObject* boxes = checked(PyList_New(static_cast<Py_ssize_t>(e.boxes.size())));
    for (size_t j = 0; j < e.boxes.size(); ++j) {
      PyList_SET_ITEM(boxes, static_cast<Py_ssize_t>(j), box_tuple(e.boxes[j], e.cells[j], num_bins, grid));
    }
    PyObject* span = tuple_of({ints.get(e.start), ints.get(e.end)});
    PyList_SET_ITEM(entities.ptr(), static_cast<Py_ssize_t>(k), tuple_of({name, span, boxes}));
  }
  return py::make_tuple(clean, entities);
}

// One result per text: (clean_text, entities), or None where an index overflows int64 (the caller then
// uses the reference parser, which has Python's unbounded ints).
py::list extract_entities_batch(const py::sequence& texts, int64_t num_bins) {
  if (num_bins < 1) throw py::value_error("num_bins must be >= 1, got " + std::to_string(num_bins));
  const size_t n = py::len(texts);
  std::vector<py::object> keep(n);
  std::vector<size_t> start(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    keep[i] = texts[i];
    if (!PyUnicode_Check(keep[i].ptr())) {
      throw py::type_error("texts[" + std::to_string(i) + "] must be str, got " +
                           std::string(Py_TYPE(keep[i].ptr())->tp_name));
    }
    start[i + 1] = start[i] + static_cast<size_t>(PyUnicode_GET_LENGTH(keep[i].ptr()));
  }
  // One uninitialised arena for every text's code points: no per-string allocation or zero-fill.
  std::unique_ptr<char32_t[]> arena(new char32_t[std::max<size_t>(start[n], 1)]);
  for (size_t i = 0; i < n; ++i) read_code_points(keep[i].ptr(), arena.get() + start[i]);
  auto text_of = [&](size_t i) { return std::u32string_view(arena.get() + start[i], start[i + 1] - start[i]); };
  std::vector<Extraction> results(n);
  {
    py::gil_scoped_release release;
    at::parallel_for(0, static_cast<int64_t>(n), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) results[i] = mmcore::grounding::extract_entities(text_of(i), num_bins);
    });
  }
  py::list out(n);
  GridFloats grid(num_bins);
  SmallInts ints;
  for (size_t i = 0; i < n; ++i) {
    out[i] = results[i].ok ? to_python(results[i], keep[i].ptr(), num_bins, grid, ints) : py::none();
  }
  return out;
}

// Bins as a list of lists of Python ints, built with the CPython API (a million samples make a million ints).
py::list first_fit_decreasing(const at::Tensor& lengths, int64_t budget) {
  TORCH_CHECK_VALUE(lengths.dim() == 1, "lengths must be 1-D, got shape ", lengths.sizes());
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "lengths must be a CPU tensor, got ", lengths.device());
  const at::Tensor contiguous = lengths.contiguous();
  mmcore::data::Bins bins;
  {
    py::gil_scoped_release release;
    bins = mmcore::data::first_fit_decreasing(contiguous.const_data_ptr<int64_t>(), contiguous.numel(), budget);
  }
  py::list out(bins.num_bins());
  for (int64_t b = 0; b < bins.num_bins(); ++b) {
    const int64_t begin = bins.offsets[b], size = bins.offsets[b + 1] - begin;
    py::object bin = py::reinterpret_steal<py::object>(checked(PyList_New(static_cast<Py_ssize_t>(size))));
    for (int64_t k = 0; k < size; ++k) {
      PyList_SET_ITEM(bin.ptr(), static_cast<Py_ssize_t>(k), checked(PyLong_FromLongLong(bins.indices[begin + k])));
    }
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(b), bin.release().ptr());  // steals the reference
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmcore compiled extension: CPU (and, when built, CUDA) kernels and C++ helpers";
  m.def("extract_entities_batch", &extract_entities_batch, py::arg("texts"), py::arg("num_bins") = 32,
        "Parse Kosmos-2 grounded strings; see mmcore.grounding.extract_entities_batch.");
  m.def("first_fit_decreasing", &first_fit_decreasing, py::arg("lengths"), py::arg("budget"),
        "First-fit-decreasing bin packing of int64 lengths; see mmcore.data.packing.first_fit_decreasing.");
  m.def("int8_dot_fast", &mmcore::decoding::int8_dot_fast,
        "Whether screen_logits_int8 runs its AVX512-VNNI kernel here (else a scalar loop with the same results).");
#ifdef MMCORE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
