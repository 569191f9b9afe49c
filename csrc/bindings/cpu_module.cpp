// genkernels._C: the CPU kernels.
#include <pybind11/stl.h>

#include <array>

#include "bindings/ops.h"
#include "common/cpu_isa.h"
#include "common/philox.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "genkernels CPU kernels";
  gk::bindings::bind_ops<gk::CpuExec>(m);
  m.attr("__version__") = GK_VERSION;
  m.attr("cpu_isas_built") = GK_CPU_ISAS;
  m.def("cpu_isa", [] { return gk::isa_name(gk::cpu_isa()); }, "Instruction set the CPU kernels use on this machine.");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
        const gk::Philox4 r = gk::philox4x32_10(gk::Philox4{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      "One Philox4x32-10 block: four 32-bit words from a 128-bit counter and a 64-bit key.");
}
