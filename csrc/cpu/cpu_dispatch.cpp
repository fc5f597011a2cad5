// Run-time choice of the CPU kernels' SIMD level (cpu_kernels.h), and the CPU registrations of the
// layer ops, which forward to the chosen level's kernels. Compiled with the baseline flags only.
//
// The level: the best one this build has that both the CPU (with the OS's support for its
// registers) and ATen choose; ATen's choice (at::get_cpu_capability) follows its own
// ATEN_CPU_CAPABILITY setting, so ATEN_CPU_CAPABILITY=avx2 lowers ours too.
// LSTM_FUSED_CPU_CAPABILITY=avx512|avx2|default asks for a level (for tests and measurements). A
// level the CPU lacks, or an unknown name, is an error, raised by lstm_fused.cpu_capability()
// (which `import lstm_fused` calls) and by every CPU op: a run that asked for a level must never
// silently measure or test another one.
// The choice is made once, on first use, and kept for the life of the process.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <utility>

#include "../gradient_gemms.h"
#include "cpu_kernels.h"

namespace lstm_fused {
namespace {

enum class CpuLevel { Default = 0, Avx2 = 1, Avx512 = 2 };

const char* level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::Avx512: return "avx512";
    case CpuLevel::Avx2: return "avx2";
    default: return "default";
  }
}

// What the CPU can run, as ATen decides its AVX2 and AVX512 levels (cpuinfo: AVX-512 F, BW, VL
// and DQ; AVX2 and FMA), plus F16C, which the AVX2 objects are compiled for (-mf16c). libgcc's
// __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
// `missing` receives the features the next level up lacks.
CpuLevel hardware_level(std::string& missing_avx2, std::string& missing_avx512) {
#if defined(LSTM_FUSED_CPU_LEVELS_X86)
  __builtin_cpu_init();
  const auto note = [](std::string& missing, bool has, const char* feature) {
    if (!has) missing += std::string(missing.empty() ? "" : ", ") + feature;
  };
  note(missing_avx2, __builtin_cpu_supports("avx2"), "avx2");
  note(missing_avx2, __builtin_cpu_supports("fma"), "fma");
  note(missing_avx2, __builtin_cpu_supports("f16c"), "f16c");
  missing_avx512 = missing_avx2;
  note(missing_avx512, __builtin_cpu_supports("avx512f"), "avx512f");
  note(missing_avx512, __builtin_cpu_supports("avx512bw"), "avx512bw");
  note(missing_avx512, __builtin_cpu_supports("avx512vl"), "avx512vl");
  note(missing_avx512, __builtin_cpu_supports("avx512dq"), "avx512dq");
  if (missing_avx512.empty()) return CpuLevel::Avx512;
  if (missing_avx2.empty()) return CpuLevel::Avx2;
  return CpuLevel::Default;
#else
  missing_avx2 = missing_avx512 = "an x86-64 CPU (this build has only the default kernels)";
  return CpuLevel::Default;
#endif
}

CpuLevel aten_level() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return CpuLevel::Avx512;
  if (capability == "AVX2") return CpuLevel::Avx2;
  return CpuLevel::Default;
}

struct Choice {
  CpuLevel level = CpuLevel::Default;
  CpuKernels kernels;
  std::string error;  // non-empty: LSTM_FUSED_CPU_CAPABILITY asked for what cannot run here
};

CpuKernels kernels_of(CpuLevel level) {
  CpuKernels kernels;
  switch (level) {
#if defined(LSTM_FUSED_CPU_LEVELS_X86)
    case CpuLevel::Avx512:
      AVX512::add_lstm_kernels(kernels);
      AVX512::add_gru_kernels(kernels);
      break;
    case CpuLevel::Avx2:
      AVX2::add_lstm_kernels(kernels);
      AVX2::add_gru_kernels(kernels);
      break;
#endif
    default:
      DEFAULT::add_lstm_kernels(kernels);
      DEFAULT::add_gru_kernels(kernels);
  }
  return kernels;
}

Choice choose() {
  Choice choice;
  std::string missing_avx2, missing_avx512;
  const CpuLevel hardware = hardware_level(missing_avx2, missing_avx512);
  choice.level = std::min(hardware, aten_level());
  const char* setting = std::getenv("LSTM_FUSED_CPU_CAPABILITY");
  std::string wanted = setting != nullptr ? setting : "";
  wanted.erase(std::remove_if(wanted.begin(), wanted.end(), [](unsigned char ch) { return std::isspace(ch); }),
               wanted.end());
  std::transform(wanted.begin(), wanted.end(), wanted.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (!wanted.empty()) {
    if (wanted == "avx512" || wanted == "avx2" || wanted == "default") {
      const CpuLevel asked = wanted == "avx512" ? CpuLevel::Avx512 : wanted == "avx2" ? CpuLevel::Avx2 : CpuLevel::Default;
      if (asked <= hardware) {
        choice.level = asked;  // an explicit request outranks ATEN_CPU_CAPABILITY
      } else {
        choice.error = "lstm_fused: LSTM_FUSED_CPU_CAPABILITY=" + wanted + " asks for the " + wanted +
                       " CPU kernels, but this CPU lacks " +
                       (asked == CpuLevel::Avx512 ? missing_avx512 : missing_avx2) + "; it can run " +
                       level_name(hardware) + " and below. Unset it to use the best level this CPU has.";
      }
    } else {
      choice.error = "lstm_fused: LSTM_FUSED_CPU_CAPABILITY=" + std::string(setting) +
                     " is not a CPU kernel level; use avx512, avx2 or default (or unset it).";
    }
  }
  choice.kernels = kernels_of(choice.level);
  return choice;
}

const Choice& chosen() {
  static const Choice choice = choose();
  return choice;
}

const CpuKernels& kernels() {
  const Choice& choice = chosen();
  TORCH_CHECK(choice.error.empty(), choice.error);
  return choice.kernels;
}

std::string cpu_capability() {
  kernels();  // raises the choice's error, if any
  return level_name(chosen().level);
}

// The registered CPU kernel of each op: a call through the chosen level's table.
template <typename Fn, Fn* CpuKernels::*entry>
struct Forward;
template <typename Result, typename... Args, Result (*CpuKernels::*entry)(Args...)>
struct Forward<Result(Args...), entry> {
  static Result call(Args... args) { return (kernels().*entry)(std::forward<Args>(args)...); }
};
#define LSTM_FUSED_CPU_ENTRY(name) \
  &Forward<std::remove_pointer_t<decltype(CpuKernels::name)>, &CpuKernels::name>::call

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // Which SIMD level's CPU kernels run: "avx512", "avx2" or "default" (cpu_dispatch.cpp).
  m.def("cpu_capability() -> str", &cpu_capability);
  // Whether the backward's gradient GEMM operands can live in oneDNN's memory in this process
  // (gemm_operand_buffer, gradient_gemms.h): for the tests, which check that this torch allows it.
  m.def("_onednn_operand_buffers() -> bool", &onednn_operand_buffers);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("lstm_layer_forward", LSTM_FUSED_CPU_ENTRY(lstm_layer_forward));
  m.impl("lstm_layer_inference", LSTM_FUSED_CPU_ENTRY(lstm_layer_inference));
  m.impl("lstm_layer_backward", LSTM_FUSED_CPU_ENTRY(lstm_layer_backward));
  m.impl("gru_layer_forward", LSTM_FUSED_CPU_ENTRY(gru_layer_forward));
  m.impl("gru_layer_inference", LSTM_FUSED_CPU_ENTRY(gru_layer_inference));
  m.impl("gru_layer_backward", LSTM_FUSED_CPU_ENTRY(gru_layer_backward));
}

}  // namespace lstm_fused
