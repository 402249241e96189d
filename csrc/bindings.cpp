// Python bindings of mmcore._C for what is not a tensor op. Tensor ops are registered with the dispatcher
// (TORCH_LIBRARY_IMPL) in their own files and reached through torch.ops.mmcore.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "grounding/entities.h"

namespace py = pybind11;
using mmcore::grounding::Extraction;

namespace {

std::u32string read_code_points(PyObject* s) {
  // Reads the str's code points as stored (lone surrogates included), never through UTF-8.
  const Py_ssize_t n = PyUnicode_GET_LENGTH(s);
  const int kind = PyUnicode_KIND(s);
  const void* data = PyUnicode_DATA(s);
  std::u32string out(static_cast<size_t>(n), U'\0');
  for (Py_ssize_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = PyUnicode_READ(kind, data, i);
  return out;
}

py::object steal(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::object to_python(const Extraction& ex, PyObject* text) {
  py::object clean =
      steal(PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, ex.clean_text.data(), ex.clean_text.size()));
  py::list entities(ex.entities.size());
  for (size_t k = 0; k < ex.entities.size(); ++k) {
    const auto& e = ex.entities[k];
    py::object name = e.has_phrase
                          ? steal(PyUnicode_Substring(text, static_cast<Py_ssize_t>(e.name_begin),
                                                      static_cast<Py_ssize_t>(e.name_end)))
                          : steal(PyUnicode_FromFormat("<patch_index_%lld><patch_index_%lld>",
                                                       static_cast<long long>(e.ul), static_cast<long long>(e.lr)));
    py::list boxes(e.boxes.size());
    for (size_t j = 0; j < e.boxes.size(); ++j) {
      const auto& b = e.boxes[j];
      boxes[j] = py::make_tuple(b.x1, b.y1, b.x2, b.y2);
    }
    entities[k] = py::make_tuple(name, py::make_tuple(e.start, e.end), boxes);
  }
  return py::make_tuple(clean, entities);
}

// One result per text: (clean_text, entities), or None where an index overflows int64 (the caller then
// uses the reference parser, which has Python's unbounded ints).
py::list extract_entities_batch(const py::sequence& texts, int64_t num_bins) {
  if (num_bins < 1) throw py::value_error("num_bins must be >= 1, got " + std::to_string(num_bins));
  const size_t n = py::len(texts);
  std::vector<py::object> keep(n);
  std::vector<std::u32string> bufs(n);
  for (size_t i = 0; i < n; ++i) {
    keep[i] = texts[i];
    if (!PyUnicode_Check(keep[i].ptr())) {
      throw py::type_error("texts[" + std::to_string(i) + "] must be str, got " +
                           std::string(Py_TYPE(keep[i].ptr())->tp_name));
    }
    bufs[i] = read_code_points(keep[i].ptr());
  }
  std::vector<Extraction> results(n);
  {
    py::gil_scoped_release release;
    at::parallel_for(0, static_cast<int64_t>(n), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) results[i] = mmcore::grounding::extract_entities(bufs[i], num_bins);
    });
  }
  py::list out(n);
  for (size_t i = 0; i < n; ++i) out[i] = results[i].ok ? to_python(results[i], keep[i].ptr()) : py::none();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmcore compiled extension: CPU (and, when built, CUDA) kernels and C++ helpers";
  m.def("extract_entities_batch", &extract_entities_batch, py::arg("texts"), py::arg("num_bins") = 32,
        "Parse Kosmos-2 grounded strings; see mmcore.grounding.extract_entities_batch.");
#ifdef MMCORE_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
