// pybind11 module `arpo._C`: exposes arpo::BlockManager with the same Python API as BlockManagerPy.
//
// C++ errors become the exception classes of arpo/engine/errors.py (imported once when the module loads),
// so both twins raise the very same types.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "block_manager.h"

namespace py = pybind11;

namespace {

// Borrowed for the life of the process: the errors module stays in sys.modules.
PyObject* g_error_classes[4] = {nullptr, nullptr, nullptr, nullptr};

PyObject* error_class(arpo::Error::Kind kind) { return g_error_classes[static_cast<int>(kind)]; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "arpo C++ extension: the paged-KV block manager (twin of arpo.engine.block_manager_py).";

  py::module_ errors = py::module_::import("arpo.engine.errors");
  const char* names[4] = {"OutOfBlocksError", "UnknownSequenceError", "DuplicateSequenceError",
                          "InvalidArgumentError"};
  for (int k = 0; k < 4; ++k) g_error_classes[k] = py::object(errors.attr(names[k])).release().ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const arpo::Error& e) {
      py::set_error(py::handle(error_class(e.kind())), e.what());
    }
  });

  m.attr("ROOT_HASH") = py::int_(arpo::kRootHash);
  m.def(
      "chain_hash",
      [](uint64_t prev, const std::vector<int64_t>& tokens) {
        return arpo::chain_hash(prev, tokens.data(), tokens.size());
      },
      py::arg("prev"), py::arg("token_ids"), "64-bit hash of one block chained on the previous block's hash.");

  py::class_<arpo::BlockManager>(m, "BlockManager",
                                 "Paged-KV block manager with prefix caching, fork and copy-on-write (C++).")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true)
      .def_property_readonly("num_blocks", &arpo::BlockManager::num_blocks)
      .def_property_readonly("block_size", &arpo::BlockManager::block_size)
      .def_property_readonly("enable_prefix_caching", &arpo::BlockManager::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &arpo::BlockManager::num_free_blocks)
      .def("has", &arpo::BlockManager::has, py::arg("seq_id"))
      .def("seq_ids", &arpo::BlockManager::seq_ids)
      .def("block_table", &arpo::BlockManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &arpo::BlockManager::num_tokens, py::arg("seq_id"))
      .def("ref_count", &arpo::BlockManager::ref_count, py::arg("block_id"))
      .def("can_allocate", &arpo::BlockManager::can_allocate, py::arg("num_tokens"))
      .def("can_append", &arpo::BlockManager::can_append, py::arg("seq_id"), py::arg("n") = 1)
      .def("allocate", &arpo::BlockManager::allocate, py::arg("seq_id"), py::arg("token_ids"),
           "Create the block table for a prompt; returns how many leading tokens are already cached.")
      .def("append", &arpo::BlockManager::append, py::arg("seq_id"), py::arg("n") = 1,
           py::arg("token_ids") = py::none(),
           "Grow a sequence by n tokens; returns (slots to write, block copies to perform before writing).")
      .def("fork", &arpo::BlockManager::fork, py::arg("parent_id"), py::arg("child_id"),
           py::arg("at") = py::none(), "Share the parent's first `at` tokens (default all); copies nothing.")
      .def("free", &arpo::BlockManager::free, py::arg("seq_id"))
      .def("__repr__", [](const arpo::BlockManager& bm) {
        return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
               ", block_size=" + std::to_string(bm.block_size()) +
               ", free=" + std::to_string(bm.num_free_blocks()) +
               ", sequences=" + std::to_string(bm.seq_ids().size()) + ")";
      });
}
