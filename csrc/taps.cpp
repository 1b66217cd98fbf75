// Filter taps: Pillow's bicubic weights in the fixed point of each kind (see taps.h).
#include "taps.h"

#include <cmath>
#include <cstdlib>
#include <climits>

namespace fastload {
namespace {

constexpr double kBicubicSupport = 2.0;

// Pillow's bicubic filter (a = -0.5).
double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

int32_t round_fixed(double v, int bits) {  // Pillow's rounding: half away from zero
  const double fixed = v * (1 << bits);
  return static_cast<int32_t>(v < 0 ? -0.5 + fixed : 0.5 + fixed);
}

}  // namespace

Taps::Taps(int in_size, int out_size, bool exact, bool simd) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kBicubicSupport * filterscale;
  const double ss = 1.0 / filterscale;
  ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  npairs = (ksize + 1) / 2;
  first.resize(out_size);
  count.resize(out_size);
  // Normalized weights first (zero past each output's count), then the fixed point.
  std::vector<double> norm(static_cast<size_t>(out_size) * ksize, 0.0);
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    int lo = static_cast<int>(center - support + 0.5);
    if (lo < 0) lo = 0;
    int hi = static_cast<int>(center + support + 0.5);
    if (hi > in_size) hi = in_size;
    double* w = &norm[static_cast<size_t>(i) * ksize];
    double total = 0.0;
    for (int k = 0; k < hi - lo; ++k) {
      w[k] = bicubic((k + lo - center + 0.5) * ss);
      total += w[k];
    }
    if (total != 0.0)
      for (int k = 0; k < hi - lo; ++k) w[k] /= total;
    first[i] = lo;
    count[i] = hi - lo;
  }
  const bool bytes_fit = filterscale <= kByteMaxScale && npairs <= kBytePairs;
  kind = exact || !simd ? Kind::kExact : bytes_fit ? Kind::kFast8 : Kind::kFast16;
  if (kind == Kind::kFast8 && !quantize_bytes(norm)) kind = Kind::kFast16;
  if (kind == Kind::kExact) {
    weights_.resize(norm.size());
    for (size_t j = 0; j < norm.size(); ++j) weights_[j] = round_fixed(norm[j], kPrecisionBits);
  } else if (kind == Kind::kFast16) {
    weights_.assign(static_cast<size_t>(out_size) * npairs, 0);
    for (size_t j = 0; j < norm.size(); ++j) {
      const size_t i = j / ksize, k = j % ksize;
      const auto w = static_cast<uint16_t>(static_cast<int16_t>(round_fixed(norm[j], kFastBits)));
      weights_[i * npairs + k / 2] |= static_cast<int32_t>(w) << (16 * (k % 2));
    }
  }
}

// kFast8's weights, each output's corrected on its largest so that they sum to exactly
// one. False (and no bytes) where a sum could leave 16 bits: 255 times the weights'
// magnitudes, plus the rounding half.
bool Taps::quantize_bytes(const std::vector<double>& norm) {
  bytes_.assign(first.size() * npairs, 0);
  std::vector<int> q(ksize);
  for (size_t i = 0; i < first.size(); ++i) {
    int sum = 0, largest = 0, magnitude = 0;
    for (int k = 0; k < ksize; ++k) {
      q[k] = round_fixed(norm[i * ksize + k], kByteBits);
      sum += q[k];
      if (q[k] > q[largest]) largest = k;
    }
    q[largest] += (1 << kByteBits) - sum;
    for (int k = 0; k < ksize; ++k) {
      magnitude += std::abs(q[k]);
      bytes_[i * npairs + k / 2] |= static_cast<uint16_t>(static_cast<uint8_t>(q[k]) << (8 * (k % 2)));
    }
    if (255 * magnitude + (1 << (kByteBits - 1)) > INT16_MAX) {
      bytes_.clear();
      return false;
    }
  }
  return true;
}

}  // namespace fastload
