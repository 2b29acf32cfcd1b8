/* The CPU kernels of the operators cbam_dsa::block_forward and cbam_dsa::block_backward, over the C entry points of
 * kernels.c, and block_forward's AutogradCPU kernel, registered with PyTorch's dispatcher by cbam_dsa_register()
 * (called once by native.py).
 *
 * Each kernel checks its arguments (a ValueError that names the argument, as ops/library.py's checks word it),
 * converts the tensors the C code reads to float32/float64, contiguous (x and the output's gradient may also stay
 * channels_last, which the C code reads as it is; the output and x's gradient then come out so), builds the merged
 * branches' layout (cached per branch configuration) and the dimensions, allocates the outputs and calls the C
 * code. Where the C code does not apply (CBAM_DSA_NATIVE=0, an empty input, a backward given a nonzero gradient for
 * one of the maps), it calls the PyTorch implementation instead, registered in Python as
 * cbam_dsa::_pytorch_block_forward / _backward.
 *
 * The C code's status becomes an exception: out of memory (status 1) a torch.OutOfMemoryError, any other a
 * RuntimeError that names it. No C++ exception crosses the C entry points of this file.
 */
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

extern "C" {
int block_forward_f32(const float *const *, const int64_t *, float *const *, const int64_t *, const double *, int);
int block_forward_f64(const double *const *, const int64_t *, double *const *, const int64_t *, const double *, int);
int block_backward_f32(const float *, const float *const *, const float *const *, const int64_t *, float *const *,
                       double *, int, const int64_t *, const double *, int);
int block_backward_f64(const double *, const double *const *, const double *const *, const int64_t *,
                       double *const *, double *, int, const int64_t *, const double *, int);
}

namespace {

using at::Tensor;
using at::TensorList;
using Maybe = std::optional<Tensor>;
using ForwardResult = std::vector<Tensor>;  // out, ca, sa, fusion_w, router_w, then the saved tensors

constexpr int64_t KEEP_POOLS_FROM_PIXELS = 64;  // ops/pytorch.py: both pooled descriptors saved from here on, else max
constexpr int N = 13;                           // the operators' single tensor arguments (library.TENSOR_ARGS)
// The positions among them of the C code's inputs, in its order (the temperatures reach it as numbers); the branch
// kernels and biases follow.
constexpr int KERNEL_ARGS[11] = {0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12};

// The operators' arguments, as one struct (the schema's order; library.py documents them).
struct Args {
  const Tensor &x, &fc1_weight, &fc1_bias, &fc2_weight, &fc2_bias;
  const Maybe &fusion_logits;
  const Tensor &ca_temperature, &sa_temperature;
  const Maybe &alpha, &router_fc1_weight, &router_fc1_bias, &router_fc2_weight, &router_fc2_bias;
  TensorList branch_weights, branch_biases;
  at::IntArrayRef dilations;
  c10::string_view act, ca_gate, sa_gate;

  // The single tensor arguments in order (nullptr for a None).
  std::array<const Tensor *, N> singles() const {
    auto opt = [](const Maybe &t) { return t.has_value() ? &*t : nullptr; };
    return {&x, &fc1_weight, &fc1_bias, &fc2_weight, &fc2_bias, opt(fusion_logits), &ca_temperature,
            &sa_temperature, opt(alpha), opt(router_fc1_weight), opt(router_fc1_bias), opt(router_fc2_weight),
            opt(router_fc2_bias)};
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Argument checks, worded as library.check_arguments / check_backward_arguments word them.

std::string shape_text(at::IntArrayRef shape) {  // as Python prints a tuple
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string dtype_text(at::ScalarType type) {  // as Python prints a torch.dtype
  static const std::map<at::ScalarType, const char *> names = {
      {at::kFloat, "float32"}, {at::kDouble, "float64"}, {at::kHalf, "float16"},  {at::kBFloat16, "bfloat16"},
      {at::kLong, "int64"},    {at::kInt, "int32"},      {at::kShort, "int16"},   {at::kChar, "int8"},
      {at::kByte, "uint8"},    {at::kBool, "bool"},      {at::kComplexFloat, "complex64"},
      {at::kComplexDouble, "complex128"}};
  auto found = names.find(type);
  return std::string("torch.") + (found == names.end() ? c10::toString(type) : found->second);
}

bool fits(const Tensor &t, at::IntArrayRef shape, const at::Device &device) {
  return t.sizes() == shape && t.device() == device && at::isFloatingType(t.scalar_type());
}

[[noreturn]] void bad(const char *where, const std::string &name, const Tensor &t, at::IntArrayRef shape,
                      const at::Device &device) {
  TORCH_CHECK_VALUE(t.sizes() == shape, where, ": ", name, " must have shape ", shape_text(shape), ", but got ",
                    shape_text(t.sizes()));
  TORCH_CHECK_VALUE(false, where, ": ", name, " must be a floating-point tensor on x's device (", device.str(),
                    "), but got ", dtype_text(t.scalar_type()), " on ", t.device().str());
}

void expect(const char *where, const std::string &name, const Tensor &t, at::IntArrayRef shape,
            const at::Device &device) {
  if (!fits(t, shape, device)) bad(where, name, t, shape, device);
}

std::string choices(std::initializer_list<const char *> allowed) {  // as Python prints a tuple of str
  std::string out = "(";
  for (auto it = allowed.begin(); it != allowed.end(); ++it)
    out += (it == allowed.begin() ? "'" : ", '") + std::string(*it) + "'";
  return out + ")";
}

void one_of(const char *where, const char *name, c10::string_view value, std::initializer_list<const char *> allowed) {
  for (const char *a : allowed)
    if (value == a) return;
  TORCH_CHECK_VALUE(false, where, ": ", name, " must be one of ", choices(allowed), ", but got '",
                    std::string(value), "'");
}

void check_forward(const Args &a, const char *where) {
  const Tensor &x = a.x;
  TORCH_CHECK_VALUE(x.dim() == 4 && at::isFloatingType(x.scalar_type()) && x.size(2) > 0 && x.size(3) > 0, where,
                    ": x must be a floating-point (B, C, H, W) tensor with H, W >= 1, but got shape ",
                    shape_text(x.sizes()), " and dtype ", dtype_text(x.scalar_type()));
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(a.fc1_weight.dim() == 4 && a.fc1_weight.size(1) == c, where, ": x has ", c,
                    " channels, but fc1_weight has shape ", shape_text(a.fc1_weight.sizes()), " (expected (hidden, ",
                    c, ", 1, 1))");
  const int64_t hidden = a.fc1_weight.size(0), branches = a.branch_weights.size();
  TORCH_CHECK_VALUE(branches > 0 && (int64_t)a.branch_biases.size() == branches &&
                        (int64_t)a.dilations.size() == branches,
                    where, ": branch_weights, branch_biases and dilations must have one entry per branch (at least ",
                    "one), but got ", branches, ", ", a.branch_biases.size(), " and ", a.dilations.size());
  const at::Device device = x.device();
  expect(where, "fc1_weight", a.fc1_weight, {hidden, c, 1, 1}, device);
  expect(where, "fc1_bias", a.fc1_bias, {hidden}, device);
  expect(where, "fc2_weight", a.fc2_weight, {c, hidden, 1, 1}, device);
  expect(where, "fc2_bias", a.fc2_bias, {c}, device);
  expect(where, "ca_temperature", a.ca_temperature, {}, device);
  expect(where, "sa_temperature", a.sa_temperature, {}, device);
  if (a.fusion_logits) expect(where, "fusion_logits", *a.fusion_logits, {2}, device);
  if (a.alpha) expect(where, "alpha", *a.alpha, {}, device);
  const Maybe *router[4] = {&a.router_fc1_weight, &a.router_fc1_bias, &a.router_fc2_weight, &a.router_fc2_bias};
  static const char *router_names[4] = {"router_fc1_weight", "router_fc1_bias", "router_fc2_weight",
                                        "router_fc2_bias"};
  int given = 0;
  for (auto *t : router) given += t->has_value();
  if (given) {
    for (int i = 0; i < 4; ++i)
      TORCH_CHECK_VALUE(router[i]->has_value(), where, ": ", router_names[i],
                        " is None, but the other router tensors are given");
    const Tensor &r1 = **router[0];
    const int64_t rh = r1.dim() ? r1.size(0) : -1;
    const std::vector<int64_t> shapes[4] = {{rh, 2, 1, 1}, {rh}, {branches, rh, 1, 1}, {branches}};
    for (int i = 0; i < 4; ++i) expect(where, router_names[i], **router[i], shapes[i], device);
  }
  for (int64_t k = 0; k < branches; ++k) {
    const Tensor &weight = a.branch_weights[k];
    const int64_t size = weight.dim() ? weight.size(-1) : 0, dilation = a.dilations[k];
    TORCH_CHECK_VALUE(size % 2 == 1 && dilation >= 1, where, ": branch ", k,
                      " must have an odd kernel size and a dilation >= 1, but got kernel shape ",
                      shape_text(weight.sizes()), " and dilation ", dilation);
    expect(where, "branch_weights[" + std::to_string(k) + "]", weight, {1, 2, size, size}, device);
    expect(where, "branch_biases[" + std::to_string(k) + "]", a.branch_biases[k], {1}, device);
  }
  one_of(where, "act", a.act, {"relu", "silu"});
  one_of(where, "ca_gate", a.ca_gate, {"sigmoid", "hardsigmoid"});
  one_of(where, "sa_gate", a.sa_gate, {"sigmoid", "hardsigmoid"});
}

// The shapes of the saved list (ops/pytorch.py: _saved_shapes): z, s, logit, router, router hidden, pre, pools.
std::array<std::vector<int64_t>, 7> saved_shapes(const Args &a) {
  const int64_t b = a.x.size(0), c = a.x.size(1), h = a.x.size(2), w = a.x.size(3);
  const int64_t rh = a.router_fc1_weight ? a.router_fc1_weight->size(0) : 1;
  const int64_t k = a.branch_weights.size();
  std::vector<int64_t> pools = h * w >= KEEP_POOLS_FROM_PIXELS ? std::vector<int64_t>{2 * b, c}
                                                               : std::vector<int64_t>{b, c};
  return {std::vector<int64_t>{b, c}, {b, 2, h, w}, {b, 1, h, w}, {b, k}, {b, rh}, {2 * b, a.fc1_weight.size(0)},
          pools};
}

void check_backward(const Args &a, const std::array<const Maybe *, 5> &grads, TensorList saved,
                    const c10::List<bool> &needs) {
  const char *where = "cbam_dsa::block_backward";
  check_forward(a, where);
  const Tensor &x = a.x;
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = a.branch_weights.size();
  const std::vector<int64_t> shapes[5] = {x.sizes().vec(), {b, c, 1, 1}, {b, 1, h, w}, {2}, {b, k}};
  static const char *names[5] = {"grad_out", "grad_ca", "grad_sa", "grad_fusion_w", "grad_router_w"};
  for (int i = 0; i < 5; ++i)
    if (grads[i]->has_value()) expect(where, names[i], **grads[i], shapes[i], x.device());
  TORCH_CHECK_VALUE(saved.size() == 7, where, ": saved must be the forward's list of 7 tensors, but got ",
                    saved.size());
  const auto expected = saved_shapes(a);
  for (int i = 0; i < 7; ++i) expect(where, "saved[" + std::to_string(i) + "]", saved[i], expected[i], x.device());
  const int64_t count = N + 2 * k;
  TORCH_CHECK_VALUE((int64_t)needs.size() == count, where, ": needs must have one entry per tensor argument (",
                    count, "), but got ", needs.size());
}

// ---------------------------------------------------------------------------------------------------------------
// The merged branches' layout (native.py's tap_layout in Python before): the K kernels' element counts, the gather
// list of the (K, T) mixing matrix, then the T taps (c, dy, dx); cached per ((size, dilation), ...).

struct Layout {
  int64_t taps = 0;
  std::vector<int64_t> packed;
};

const Layout &layout(const std::vector<std::pair<int64_t, int64_t>> &specs) {
  static std::mutex lock;
  static std::map<std::vector<std::pair<int64_t, int64_t>>, Layout> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto found = cache.find(specs);
  if (found != cache.end()) return found->second;
  std::map<std::array<int64_t, 3>, int64_t> columns;
  std::vector<std::array<int64_t, 3>> taps;
  std::vector<std::pair<int64_t, int64_t>> placed;  // (branch, column) per kernel element, in the kernels' order
  for (size_t k = 0; k < specs.size(); ++k) {
    const int64_t size = specs[k].first, dilation = specs[k].second, r = size / 2;
    for (int64_t c = 0; c < 2; ++c)
      for (int64_t i = 0; i < size; ++i)
        for (int64_t j = 0; j < size; ++j) {
          const std::array<int64_t, 3> tap = {c, (i - r) * dilation, (j - r) * dilation};
          auto column = columns.emplace(tap, (int64_t)taps.size());
          if (column.second) taps.push_back(tap);
          placed.emplace_back((int64_t)k, column.first->second);
        }
  }
  Layout out;
  out.taps = taps.size();
  for (const auto &spec : specs) out.packed.push_back(2 * spec.first * spec.first);
  std::vector<int64_t> gather(specs.size() * taps.size(), (int64_t)placed.size());
  for (size_t e = 0; e < placed.size(); ++e) gather[placed[e].first * out.taps + placed[e].second] = e;
  out.packed.insert(out.packed.end(), gather.begin(), gather.end());
  for (const auto &tap : taps) out.packed.insert(out.packed.end(), tap.begin(), tap.end());
  return cache.emplace(specs, std::move(out)).first->second;
}

// ---------------------------------------------------------------------------------------------------------------
// The C calls.

// The C code's inputs: x, the MLP, the fusion logits, alpha, the router, the branch kernels and biases, in the
// compute dtype and contiguous (an undefined tensor for a None), with its layout, dimensions and temperatures.
struct Call {
  at::ScalarType type;
  std::vector<Tensor> raw;
  std::vector<const void *> pointers;
  const Layout *plan;
  int64_t dims[16];  // dims[15]: x (and out, the output's gradient, x's gradient) laid out as (B, H, W, C)
  double temperatures[2];
  int threads;
};

// How the C code splits the batch among its threads (kernels.c's forward_core, dims[13]): the number of samples in
// each chunk that one thread runs from start to end, all stages, or 0 to run each stage over the whole batch on all
// threads. A chunk's slice of x (at most kChunkBytes, at least one sample) is read from memory once and then from
// the cache. Chunks are used where the batch has a chunk for every thread and a chunk's maps outweigh the MLP's
// weights (each chunk runs the MLP on its own rows); their count is a multiple of the thread count, so that every
// thread gets as many samples, give or take one.
constexpr int64_t kChunkBytes = 1 << 20;

int64_t chunk_samples(int64_t batch, int64_t sample_bytes, int64_t pixels, int64_t hidden, int64_t threads) {
  if (threads < 1) threads = 1;
  if (batch < threads) return 0;
  int64_t samples = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, sample_bytes));
  samples = std::min(samples, (batch + threads - 1) / threads);
  int64_t chunks = (batch + samples - 1) / samples;
  chunks = (chunks + threads - 1) / threads * threads;
  samples = (batch + chunks - 1) / chunks;
  return samples * pixels >= 2 * hidden ? samples : 0;
}

// t in the compute dtype and the layout the C code reads: one pass where both the dtype and the layout change
Tensor ready(const Tensor &t, at::ScalarType type, at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  if (t.scalar_type() == type) return t.contiguous(format);  // (to() would return a permuted t itself)
  return t.to(t.options().dtype(type), false, false, format);
}

// Whether the C code reads x as channels_last (kernels.c's dims[15]): where x is laid out so and not also
// contiguous (a tensor with one channel or one pixel is both); any other layout is made contiguous for it.
bool reads_channels_last(const Tensor &x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(const Call &call) {  // after prepare()
  return call.dims[15] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void prepare(Call &call, const Args &a) {
  const Tensor &x = a.x;
  call.type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool channels_last = reads_channels_last(x);
  const auto x_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto singles = a.singles();
  const size_t branches = a.branch_weights.size();
  call.raw.reserve(11 + 2 * branches);
  auto add = [&](const Tensor *t) {
    call.raw.push_back(t ? ready(*t, call.type, t == &x ? x_format : at::MemoryFormat::Contiguous) : Tensor());
    call.pointers.push_back(t ? call.raw.back().data_ptr() : nullptr);
  };
  for (int i : KERNEL_ARGS) add(singles[i]);
  for (const Tensor &t : a.branch_weights) add(&t);
  for (const Tensor &t : a.branch_biases) add(&t);
  std::vector<std::pair<int64_t, int64_t>> specs;
  for (size_t k = 0; k < branches; ++k) specs.emplace_back(a.branch_weights[k].size(-1), a.dilations[k]);
  call.plan = &layout(specs);
  call.threads = at::get_num_threads();
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hidden = a.fc1_weight.size(0);
  const bool router = a.router_fc1_weight.has_value();
  const int64_t dims[16] = {  // kernels.c: B, C, H, W, Rh, K, T, gates hard, has router, alpha, Rm, silu, chunk,
                               // fusion, channels_last
      b, c, h, w, router ? a.router_fc1_weight->size(0) : 1, (int64_t)branches, call.plan->taps,
      a.ca_gate == "hardsigmoid", a.sa_gate == "hardsigmoid", router, a.alpha.has_value(), hidden, a.act == "silu",
      chunk_samples(b, c * h * w * (int64_t)c10::elementSize(call.type), h * w, hidden, call.threads),
      a.fusion_logits.has_value(), channels_last};
  std::memcpy(call.dims, dims, sizeof dims);
  call.temperatures[0] = a.ca_temperature.item<double>();
  call.temperatures[1] = a.sa_temperature.item<double>();
}

// Test hooks (cbam_dsa_fail_next): a status the next call of an entry point returns after running, and call counts.
std::atomic<int> forced_status[2] = {0, 0};
std::atomic<int64_t> calls[2] = {0, 0};

void status(int entry, int code) {
  calls[entry] += 1;
  const int forced = forced_status[entry].exchange(0);
  if (forced) code = forced;
  const char *name = entry ? "block_backward" : "block_forward";
  TORCH_CHECK_WITH(OutOfMemoryError, code != 1, "cbam_dsa: the C kernel ", name, " failed: out of memory (status 1)");
  TORCH_CHECK(code != 2, "cbam_dsa: the C kernel ", name, " failed: invalid dimensions (status 2)");
  TORCH_CHECK(code == 0, "cbam_dsa: the C kernel ", name, " failed: unknown error code ", code, " (status ", code,
              ")");
}

bool disabled() {  // CBAM_DSA_NATIVE=0, read at each call as build.enabled() reads it
  const char *value = std::getenv("CBAM_DSA_NATIVE");
  return value && std::strcmp(value, "0") == 0;
}

Tensor like(const Tensor &t, const Tensor &x) {  // t in x's dtype, laid out as torch.empty_like(x)
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  Tensor out = at::empty_like(x);  // contiguous for a strided view of x: then t itself may already be laid out so
  return t.scalar_type() == x.scalar_type() && t.strides() == out.strides() ? t : out.copy_(t);
}

// ---------------------------------------------------------------------------------------------------------------
// The kernels.

using ForwardSignature = ForwardResult(const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                       const Tensor &, const Maybe &, const Tensor &, const Tensor &, const Maybe &,
                                       const Maybe &, const Maybe &, const Maybe &, const Maybe &, TensorList,
                                       TensorList, at::IntArrayRef, c10::string_view, c10::string_view,
                                       c10::string_view);

using ForwardOp = c10::TypedOperatorHandle<ForwardSignature>;

std::string overload;  // the public operators' overload name (ops/library.py: OVERLOAD), from cbam_dsa_register

ForwardOp forward_op(const char *name, const char *overload = "") {  // an operator of block_forward's schema
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<ForwardSignature>();
}

ForwardResult call(const ForwardOp &op, const Args &a) {
  return op.call(a.x, a.fc1_weight, a.fc1_bias, a.fc2_weight, a.fc2_bias, a.fusion_logits, a.ca_temperature,
                 a.sa_temperature, a.alpha, a.router_fc1_weight, a.router_fc1_bias, a.router_fc2_weight,
                 a.router_fc2_bias, a.branch_weights, a.branch_biases, a.dilations, a.act, a.ca_gate, a.sa_gate);
}

ForwardResult pytorch_forward(const Args &a) {
  static const ForwardOp op = forward_op("cbam_dsa::_pytorch_block_forward");
  return call(op, a);
}

ForwardResult block_forward(const Tensor &x, const Tensor &fc1_weight, const Tensor &fc1_bias,
                            const Tensor &fc2_weight, const Tensor &fc2_bias, const Maybe &fusion_logits,
                            const Tensor &ca_temperature, const Tensor &sa_temperature, const Maybe &alpha,
                            const Maybe &router_fc1_weight, const Maybe &router_fc1_bias,
                            const Maybe &router_fc2_weight, const Maybe &router_fc2_bias, TensorList branch_weights,
                            TensorList branch_biases, at::IntArrayRef dilations, c10::string_view act,
                            c10::string_view ca_gate, c10::string_view sa_gate) {
  const Args a{x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature, sa_temperature, alpha,
               router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias, branch_weights, branch_biases,
               dilations, act, ca_gate, sa_gate};
  check_forward(a, "cbam_dsa::block_forward");
  if (disabled() || x.numel() == 0) return pytorch_forward(a);
  Call call;
  prepare(call, a);
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), k = branch_weights.size();
  const auto o = x.options().dtype(call.type);
  // kernels.c's outputs: pools, pre, z, ca, s, router hidden, router, logit, sa, out, fusion weights, router copy
  Tensor f[12] = {at::empty({2 * b, c}, o),      at::empty({2 * b, fc1_weight.size(0)}, o),
                  at::empty({b, c}, o),          at::empty({b, c, 1, 1}, o),
                  at::empty({b, 2, h, w}, o),    at::empty({b, call.dims[4]}, o),
                  at::empty({b, k}, o),          at::empty({b, 1, h, w}, o),
                  at::empty({b, 1, h, w}, o),    at::empty({b, c, h, w}, o.memory_format(format_of(call))),
                  at::empty({2}, o),             at::empty({b, k}, o)};
  void *outs[12];
  for (int i = 0; i < 12; ++i) outs[i] = f[i].data_ptr();
  const int code =
      call.type == at::kDouble
          ? block_forward_f64((const double *const *)call.pointers.data(), call.plan->packed.data(),
                              (double *const *)outs, call.dims, call.temperatures, call.threads)
          : block_forward_f32((const float *const *)call.pointers.data(), call.plan->packed.data(),
                              (float *const *)outs, call.dims, call.temperatures, call.threads);
  status(0, code);
  if (!router_fc1_weight) f[5].fill_(1);  // no router: its hidden layer is unwritten; ones, as the PyTorch version
  ForwardResult result = {like(f[9], x), f[3], f[8], f[10], f[11], f[2], f[4], f[7], f[6], f[5], f[1],
                          h * w >= KEEP_POOLS_FROM_PIXELS ? f[0] : f[0].narrow(0, b, b).clone()};
  if (x.scalar_type() != call.type)  // the maps in x's dtype (the saved tensors stay in the compute dtype)
    for (int i = 1; i < 5; ++i) result[i] = result[i].to(x.scalar_type());
  return result;
}

// The forward's autograd kernel on the CPU, in place of ops/autograd.py's Python one: where no gradient is wanted
// (grad mode off, as in a compiled graph's forward and in inference, or no argument requiring one), the CPU kernel
// below the autograd keys at once; else the autograd node of ops/autograd.py, through the operator
// cbam_dsa::_differentiable_block_forward (CompositeImplicitAutograd, in Python).
ForwardResult autograd_forward(const Tensor &x, const Tensor &fc1_weight, const Tensor &fc1_bias,
                               const Tensor &fc2_weight, const Tensor &fc2_bias, const Maybe &fusion_logits,
                               const Tensor &ca_temperature, const Tensor &sa_temperature, const Maybe &alpha,
                               const Maybe &router_fc1_weight, const Maybe &router_fc1_bias,
                               const Maybe &router_fc2_weight, const Maybe &router_fc2_bias,
                               TensorList branch_weights, TensorList branch_biases, at::IntArrayRef dilations,
                               c10::string_view act, c10::string_view ca_gate, c10::string_view sa_gate) {
  const Args a{x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature, sa_temperature, alpha,
               router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias, branch_weights, branch_biases,
               dilations, act, ca_gate, sa_gate};
  bool wanted = false;
  if (c10::GradMode::is_enabled()) {
    for (const Tensor *t : a.singles()) wanted = wanted || (t && t->requires_grad());
    for (const Tensor &t : branch_weights) wanted = wanted || t.requires_grad();
    for (const Tensor &t : branch_biases) wanted = wanted || t.requires_grad();
  }
  if (wanted) {
    static const ForwardOp differentiable = forward_op("cbam_dsa::_differentiable_block_forward");
    return call(differentiable, a);
  }
  static const ForwardOp op = forward_op("cbam_dsa::block_forward", overload.c_str());
  at::AutoDispatchBelowAutograd below;
  return call(op, a);
}

using BackwardSignature = std::vector<Tensor>(
    const Maybe &, const Maybe &, const Maybe &, const Maybe &, const Maybe &, const Tensor &, const Tensor &,
    const Tensor &, const Tensor &, const Tensor &, const Maybe &, const Tensor &, const Tensor &, const Maybe &,
    const Maybe &, const Maybe &, const Maybe &, const Maybe &, TensorList, TensorList, TensorList, at::IntArrayRef,
    c10::string_view, c10::string_view, c10::string_view, const c10::List<bool> &);

std::vector<Tensor> block_backward(const Maybe &grad_out, const Maybe &grad_ca, const Maybe &grad_sa,
                                   const Maybe &grad_fusion_w, const Maybe &grad_router_w, const Tensor &x,
                                   const Tensor &fc1_weight, const Tensor &fc1_bias, const Tensor &fc2_weight,
                                   const Tensor &fc2_bias, const Maybe &fusion_logits, const Tensor &ca_temperature,
                                   const Tensor &sa_temperature, const Maybe &alpha, const Maybe &router_fc1_weight,
                                   const Maybe &router_fc1_bias, const Maybe &router_fc2_weight,
                                   const Maybe &router_fc2_bias, TensorList branch_weights, TensorList branch_biases,
                                   TensorList saved, at::IntArrayRef dilations, c10::string_view act,
                                   c10::string_view ca_gate, c10::string_view sa_gate, const c10::List<bool> &needs) {
  const Args a{x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fusion_logits, ca_temperature, sa_temperature, alpha,
               router_fc1_weight, router_fc1_bias, router_fc2_weight, router_fc2_bias, branch_weights, branch_biases,
               dilations, act, ca_gate, sa_gate};
  const std::array<const Maybe *, 5> grads = {&grad_out, &grad_ca, &grad_sa, &grad_fusion_w, &grad_router_w};
  check_backward(a, grads, saved, needs);
  bool maps = false;  // the C backward takes the output's gradient only
  for (int i = 1; i < 5 && !maps; ++i) maps = grads[i]->has_value() && (*grads[i])->any().item<bool>();
  if (disabled() || !grad_out || maps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("cbam_dsa::_pytorch_block_backward", "")
                         .typed<BackwardSignature>();
    return op.call(grad_out, grad_ca, grad_sa, grad_fusion_w, grad_router_w, x, fc1_weight, fc1_bias, fc2_weight,
                   fc2_bias, fusion_logits, ca_temperature, sa_temperature, alpha, router_fc1_weight, router_fc1_bias,
                   router_fc2_weight, router_fc2_bias, branch_weights, branch_biases, saved, dilations, act, ca_gate,
                   sa_gate, needs);
  }
  Call call;
  prepare(call, a);
  // The C code's tensors in its order, by their position among the operators' tensor arguments (needs' order).
  const size_t branches = branch_weights.size(), n = 11 + 2 * branches;
  std::vector<int> order(KERNEL_ARGS, KERNEL_ARGS + 11);
  for (size_t i = 0; i < 2 * branches; ++i) order.push_back(N + i);
  std::vector<Tensor> kept;
  std::vector<const void *> kept_pointers;
  for (int i = 0; i < 7; ++i) {
    const bool none = i == 6 && x.size(2) * x.size(3) < KEEP_POOLS_FROM_PIXELS;  // maxima only: C recomputes both
    kept.push_back(none ? Tensor() : ready(saved[i], call.type));
    kept_pointers.push_back(none ? nullptr : kept.back().data_ptr());
  }
  const Tensor grad = ready(*grad_out, call.type, format_of(call));
  std::vector<Tensor> found(n);
  std::vector<void *> found_pointers(n, nullptr);
  for (size_t j = 0; j < n; ++j)
    if (call.raw[j].defined() && needs[order[j]] && j != 6) {  // alpha's (j = 6) comes with the scalars
      found[j] = at::empty_like(call.raw[j]);
      found_pointers[j] = found[j].data_ptr();
    }
  const Tensor scalars = at::zeros({3}, x.options().dtype(at::kDouble));  // alpha, T_ca, T_sa
  double *s = scalars.data_ptr<double>();
  const int need_alpha = needs[8];
  const int code =
      call.type == at::kDouble
          ? block_backward_f64((const double *)grad.data_ptr(), (const double *const *)call.pointers.data(),
                               (const double *const *)kept_pointers.data(), call.plan->packed.data(),
                               (double *const *)found_pointers.data(), s, need_alpha, call.dims, call.temperatures,
                               call.threads)
          : block_backward_f32((const float *)grad.data_ptr(), (const float *const *)call.pointers.data(),
                               (const float *const *)kept_pointers.data(), call.plan->packed.data(),
                               (float *const *)found_pointers.data(), s, need_alpha, call.dims, call.temperatures,
                               call.threads);
  status(1, code);
  // library.gradients_like: each gradient in its input's dtype, shape and strides; empty where not needed.
  std::vector<Tensor> by_input(N + 2 * branches);
  for (size_t j = 0; j < n; ++j) by_input[order[j]] = found[j];
  const auto singles = a.singles();
  std::vector<const Tensor *> inputs(singles.begin(), singles.end());
  for (const Tensor &t : branch_weights) inputs.push_back(&t);
  for (const Tensor &t : branch_biases) inputs.push_back(&t);
  std::vector<Tensor> result;
  result.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor *t = inputs[i];
    if (!t || !needs[i]) {
      result.push_back(x.new_empty({0}));
    } else if (i == 6 || i == 7 || i == 8) {  // T_ca, T_sa, alpha: from the float64 scalars
      result.push_back(at::empty_like(*t).fill_(s[i == 8 ? 0 : i - 5]));
    } else if (!by_input[i].defined()) {
      result.push_back(at::zeros_like(*t));
    } else {
      result.push_back(like(by_input[i], *t));
    }
  }
  return result;
}

std::unique_ptr<torch::Library> registration;
std::string last_error;

}  // namespace

extern "C" {

/* Register the kernels: both operators' for the CPU dispatch key, the forward's for AutogradCPU, under the overload
   name `overload_name` ("" for the default one; ops/library.py: OVERLOAD), once (later calls do nothing). Returns 0,
   or 1 with the reason in cbam_dsa_error(). */
int cbam_dsa_register(const char *overload_name) {
  try {
    if (!registration) {
      overload = overload_name ? overload_name : "";
      const std::string suffix = overload.empty() ? "" : "." + overload;
      auto made = std::make_unique<torch::Library>(torch::Library::IMPL, "cbam_dsa", std::nullopt, __FILE__,
                                                   __LINE__);
      const std::string forward = "block_forward" + suffix, backward = "block_backward" + suffix;
      made->impl(forward.c_str(), torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(block_forward)));
      made->impl(forward.c_str(), torch::dispatch(c10::DispatchKey::AutogradCPU, TORCH_FN(autograd_forward)));
      made->impl(backward.c_str(), torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(block_backward)));
      registration = std::move(made);
    }
    return 0;
  } catch (const std::exception &error) {
    last_error = error.what();
    return 1;
  }
}

const char *cbam_dsa_error(void) { return last_error.c_str(); }

/* Test hooks: the next call of entry point `entry` (0 forward, 1 backward) reports `status` after running; the number
   of calls of an entry point so far. */
void cbam_dsa_fail_next(int entry, int status) { forced_status[entry & 1] = status; }
int64_t cbam_dsa_calls(int entry) { return calls[entry & 1]; }
}
