// The run-time choice between the AVX2 and the portable code (see cpu.h).
#include "cpu.h"

namespace fastload {
namespace {

bool cpu_has_avx2() {
#ifdef FASTLOAD_AVX2
  __builtin_cpu_init();  // needed before __builtin_cpu_supports in static initializers
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;  // a build without the AVX2 files (not x86, or FASTLOAD_PORTABLE=1)
#endif
}

// Read by the passes without the GIL, written only by set_simd (with the GIL, from tests).
bool g_simd = cpu_has_avx2();

}  // namespace

bool simd_enabled() { return g_simd; }

bool set_simd(bool enabled) {
  g_simd = enabled && cpu_has_avx2();
  return g_simd;
}

}  // namespace fastload
