// Which code runs: the AVX2 passes where they are built (x86) and the CPU has AVX2 and FMA,
// the portable ones otherwise or when asked (`_kernels.simd(False)`, for tests and
// benchmarks).
#pragma once

namespace fastload {

bool simd_enabled();
// Asks for the AVX2 code (granted only where it is built and the CPU runs it) or for the
// portable code; returns what is now in use.
bool set_simd(bool enabled);

}  // namespace fastload
