// The CPU kernels' one translation unit and its Python bindings, built by kernels/cpu_ext.py
// (torch.utils.cpp_extension.load, -O3 -march=native). One unit because the fused entry points
// share static helpers (decode_core, the selection) and inline them. The bindings are those
// load_inline generated for these functions: wrapped so c10 errors reach Python typed, each
// function's name as its docstring.
#include "common.h"
#include "sparse_decode.h"
#include "select.h"
#include "picks.h"
#include "select_decode.h"
#include "side.h"
#include "lowbit.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_decode_cpu", torch::wrap_pybind_function(sparse_decode_cpu), "sparse_decode_cpu");
  m.def("select_tiles_cpu", torch::wrap_pybind_function(select_tiles_cpu), "select_tiles_cpu");
  m.def("quest_pick_cpu", torch::wrap_pybind_function(quest_pick_cpu), "quest_pick_cpu");
  m.def("sparq_pick_cpu", torch::wrap_pybind_function(sparq_pick_cpu), "sparq_pick_cpu");
  m.def("sparq4_pick_cpu", torch::wrap_pybind_function(sparq4_pick_cpu), "sparq4_pick_cpu");
  m.def("pq_pick_cpu", torch::wrap_pybind_function(pq_pick_cpu), "pq_pick_cpu");
  m.def("record_bounds_cpu", torch::wrap_pybind_function(record_bounds_cpu), "record_bounds_cpu");
  m.def("record_codes_cpu", torch::wrap_pybind_function(record_codes_cpu), "record_codes_cpu");
  m.def("select_decode_cpu", torch::wrap_pybind_function(select_decode_cpu), "select_decode_cpu");
  m.def("select_decode_into_cpu", torch::wrap_pybind_function(select_decode_into_cpu),
        "select_decode_into_cpu");
  m.def("sparq4_tiers_pick_cpu", torch::wrap_pybind_function(sparq4_tiers_pick_cpu),
        "sparq4_tiers_pick_cpu");
  m.def("lowbit_decode_cpu", torch::wrap_pybind_function(lowbit_decode_cpu), "lowbit_decode_cpu");
}
