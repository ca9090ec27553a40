// ctest: the papo_kernels_C CPU ops against a naive C++ loop in double precision, on small shapes.
//
// The ops are reached through the dispatcher, as Python reaches them, so this also checks their
// registration. Covered: one and two views, both strategies, several chunks and vocabulary tiles
// with a tail (V not a multiple of the vector width), temperature != 1, an ignored row (exactly
// 0) and an out-of-range target (NaN), bf16 inputs, a live and a constant view b, the chunk ops
// of the fused calls, bitwise repeatability, argument checks that name the argument, and the
// workspace epilogue ops' registration (their host reference; test_epilogue_math checks its math).
// Exit status: the number of failed checks (0 = pass).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "expect.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

using papo_kernels_test::checks;
using papo_kernels_test::expect;
using papo_kernels_test::failures;

// ---------------------------------------------------------------- the ops

std::vector<at::Tensor> forward_stats(const at::Tensor& ha, const OptTensor& hb, const at::Tensor& w,
                                      const at::Tensor& t, double temperature, const char* strategy,
                                      int64_t chunk_tokens, int64_t chunk_vocab) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("papo_kernels_C::forward_stats", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                      const at::Tensor&, double, int64_t, c10::string_view, int64_t,
                                                      int64_t)>();
  return op.call(ha, hb, w, t, temperature, -100, strategy, chunk_tokens, chunk_vocab);
}

using BackwardSig = void(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double, int64_t,
                         c10::string_view, int64_t, int64_t);

// stats: the forward's outputs; grads: 2 (one view) or 6 upstream gradients
void backward_grads(const at::Tensor& ha, const OptTensor& hb, const at::Tensor& w, const at::Tensor& t,
                    const std::vector<at::Tensor>& s, const std::vector<OptTensor>& g, const OptTensor& dh_a,
                    const OptTensor& dh_b, const OptTensor& acc, bool b_in_dw, double temperature,
                    const char* strategy, int64_t chunk_tokens, int64_t chunk_vocab) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("papo_kernels_C::backward_grads", "").typed<BackwardSig>();
  const bool two = hb.has_value();
  auto b = [&](int i) { return two ? OptTensor(s[i]) : std::nullopt; };
  auto gi = [&](size_t i) { return i < g.size() ? g[i] : std::nullopt; };
  op.call(ha, hb, w, t, s[2], s[1], b(5), b(4), b(6), b(7), gi(0), gi(1), gi(2), gi(3), gi(4), gi(5), dh_a, dh_b, acc,
          b_in_dw, temperature, -100, strategy, chunk_tokens, chunk_vocab);
}

std::vector<at::Tensor> chunk_forward(const at::Tensor& ws, const at::Tensor& ha, const OptTensor& hb,
                                      const at::Tensor& w, const at::Tensor& t, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("papo_kernels_C::chunk_forward", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                      const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>();
  return op.call(ws, ha, hb, w, t, temperature, -100, 0);
}

void chunk_backward(const at::Tensor& ws, const at::Tensor& ha, const OptTensor& hb, const at::Tensor& w,
                    const at::Tensor& t, const std::vector<at::Tensor>& s, const std::vector<OptTensor>& g,
                    const OptTensor& dh_a, const OptTensor& dh_b, const OptTensor& acc, bool b_in_dw,
                    double temperature) {
  using Sig = void(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                   const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                   const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                   double, int64_t, int64_t);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("papo_kernels_C::chunk_backward", "").typed<Sig>();
  const bool two = hb.has_value();
  auto b = [&](int i) { return two ? OptTensor(s[i]) : std::nullopt; };
  auto gi = [&](size_t i) { return i < g.size() ? g[i] : std::nullopt; };
  op.call(ws, ha, hb, w, t, s[2], s[1], b(5), b(4), b(6), b(7), gi(0), gi(1), gi(2), gi(3), gi(4), gi(5), dh_a, dh_b,
          acc, b_in_dw, temperature, -100, 0);
}

// ---------------------------------------------------------------- the naive loop (double)

struct NaiveRow {
  double logp[2], entropy[2], lse[2], kl_ab, kl_ba;
  std::vector<double> logprob[2];  // log p over the vocabulary
};

// z = h w^T / T for one row of one view
std::vector<double> logits(const at::Tensor& h, const at::Tensor& w, int64_t r, double temperature) {
  const at::Tensor hd = h.to(at::kDouble), wd = w.to(at::kDouble);
  const auto hh = hd.accessor<double, 2>();
  const auto ww = wd.accessor<double, 2>();
  const int64_t vocab = w.size(0), hid = w.size(1);
  std::vector<double> z(vocab);
  for (int64_t v = 0; v < vocab; ++v) {
    double acc = 0;
    for (int64_t k = 0; k < hid; ++k) acc += hh[r][k] * ww[v][k];
    z[v] = acc / temperature;
  }
  return z;
}

NaiveRow naive_row(const at::Tensor& ha, const OptTensor& hb, const at::Tensor& w, int64_t target, int64_t r,
                   double temperature) {
  NaiveRow out{};
  const int views = hb.has_value() ? 2 : 1;
  for (int v = 0; v < views; ++v) {
    const std::vector<double> z = logits(v == 0 ? ha : *hb, w, r, temperature);
    double m = -INFINITY, s = 0;
    for (double x : z) m = std::max(m, x);
    for (double x : z) s += std::exp(x - m);
    const double lse = m + std::log(s);
    out.lse[v] = lse;
    out.logp[v] = z[target] - lse;
    out.logprob[v].resize(z.size());
    double h = 0;
    for (size_t j = 0; j < z.size(); ++j) {
      out.logprob[v][j] = z[j] - lse;
      h -= std::exp(out.logprob[v][j]) * out.logprob[v][j];
    }
    out.entropy[v] = h;
  }
  if (views == 2) {
    out.kl_ab = out.kl_ba = 0;
    for (size_t j = 0; j < out.logprob[0].size(); ++j) {
      const double d = out.logprob[0][j] - out.logprob[1][j];
      out.kl_ab += std::exp(out.logprob[0][j]) * d;
      out.kl_ba -= std::exp(out.logprob[1][j]) * d;
    }
  }
  return out;
}

bool close(double got, double want, double tol) { return std::fabs(got - want) <= tol * (1.0 + std::fabs(want)); }

// ---------------------------------------------------------------- cases

struct Case {
  int64_t n = 13, hid = 24, vocab = 77;
  double temperature = 0.7;
  at::ScalarType dtype = at::kFloat;
};

at::Tensor make_targets(int64_t n, int64_t vocab, bool with_bad) {
  at::Tensor t = at::randint(0, vocab, {n}, at::kLong);
  t[2] = -100;                        // ignored: exactly 0, no gradient
  if (with_bad) t[5] = vocab + 3;     // out of range: NaN
  return t;
}

void check_forward(const Case& c, bool two, const char* strategy, int64_t chunk_tokens, int64_t chunk_vocab) {
  const std::string tag = std::string("forward ") + (two ? "two views " : "one view ") + strategy + " " +
                          std::string(c10::toString(c.dtype));
  const at::Tensor ha = at::randn({c.n, c.hid}).to(c.dtype);
  const OptTensor hb = two ? OptTensor((ha.to(at::kFloat) + 0.3 * at::randn({c.n, c.hid})).to(c.dtype)) : std::nullopt;
  const at::Tensor w = (at::randn({c.vocab, c.hid}) * 0.4).to(c.dtype);
  const at::Tensor t = make_targets(c.n, c.vocab, true);
  const auto outs = forward_stats(ha, hb, w, t, c.temperature, strategy, chunk_tokens, chunk_vocab);
  expect(outs.size() == (two ? 8u : 3u), tag + ": number of outputs");
  const double tol = 2e-5;
  for (int64_t r = 0; r < c.n; ++r) {
    const int64_t target = t[r].item<int64_t>();
    if (target == -100) {
      bool zero = true;
      for (const auto& o : outs) zero = zero && o[r].item<float>() == 0.0f;
      expect(zero, tag + ": ignored row is exactly 0");
      continue;
    }
    if (target >= c.vocab) {
      bool nan = true;
      for (const auto& o : outs) nan = nan && std::isnan(o[r].item<float>());
      expect(nan, tag + ": out-of-range row is NaN");
      continue;
    }
    const NaiveRow want = naive_row(ha, hb, w, target, r, c.temperature);
    const std::string row = tag + " row " + std::to_string(r);
    expect(close(outs[0][r].item<float>(), want.logp[0], tol), row + ": logp_a");
    expect(close(outs[1][r].item<float>(), want.entropy[0], tol), row + ": entropy_a");
    expect(close(outs[2][r].item<float>(), want.lse[0], tol), row + ": lse_a");
    if (!two) continue;
    expect(close(outs[3][r].item<float>(), want.logp[1], tol), row + ": logp_b");
    expect(close(outs[4][r].item<float>(), want.entropy[1], tol), row + ": entropy_b");
    expect(close(outs[5][r].item<float>(), want.lse[1], tol), row + ": lse_b");
    expect(close(outs[6][r].item<float>(), want.kl_ab, tol), row + ": kl_ab");
    expect(close(outs[7][r].item<float>(), want.kl_ba, tol), row + ": kl_ba");
  }
  const auto again = forward_stats(ha, hb, w, t, c.temperature, strategy, chunk_tokens, chunk_vocab);
  for (size_t i = 0; i < outs.size(); ++i) {
    expect(at::equal(outs[i].nan_to_num(0), again[i].nan_to_num(0)), tag + ": bitwise repeatable");
  }
}

// dZ of one row (the docs/design.md formulas in double), for views a and b
void naive_dz(const NaiveRow& s, int64_t target, const std::vector<double>& g, bool two, double temperature,
              std::vector<double>& dza, std::vector<double>& dzb) {
  const size_t vocab = s.logprob[0].size();
  dza.assign(vocab, 0);
  dzb.assign(vocab, 0);
  for (size_t j = 0; j < vocab; ++j) {
    const double lpa = s.logprob[0][j], pa = std::exp(lpa), onehot = j == static_cast<size_t>(target) ? 1 : 0;
    dza[j] = g[0] * (onehot - pa) - g[1] * pa * (lpa + s.entropy[0]);
    if (two) {
      const double lpb = s.logprob[1][j], pb = std::exp(lpb);
      dza[j] += g[4] * pa * (lpa - lpb - s.kl_ab) + g[5] * (pa - pb);
      dzb[j] = g[2] * (onehot - pb) - g[3] * pb * (lpb + s.entropy[1]) + g[4] * (pb - pa) +
               g[5] * pb * (lpb - lpa - s.kl_ba);
    }
    dza[j] /= temperature;
    dzb[j] /= temperature;
  }
}

void check_backward(const Case& c, bool two, bool b_live, const char* strategy, int64_t chunk_tokens,
                    int64_t chunk_vocab, bool chunk_ops) {
  const std::string tag = std::string(chunk_ops ? "chunk ops " : "backward ") + (two ? "two views " : "one view ") +
                          (b_live ? "live b " : "constant b ") + strategy + " " + std::string(c10::toString(c.dtype));
  const at::Tensor ha = at::randn({c.n, c.hid}).to(c.dtype);
  const OptTensor hb = two ? OptTensor((ha.to(at::kFloat) + 0.3 * at::randn({c.n, c.hid})).to(c.dtype)) : std::nullopt;
  const at::Tensor w = (at::randn({c.vocab, c.hid}) * 0.4).to(c.dtype);
  const at::Tensor t = make_targets(c.n, c.vocab, false);
  const int ng = two ? 6 : 2;
  std::vector<OptTensor> g;
  std::vector<at::Tensor> gt;
  for (int i = 0; i < ng; ++i) {
    gt.push_back(at::randn({c.n}));
    g.emplace_back(gt.back());
  }
  const at::Tensor dh_a = at::empty({c.n, c.hid}, c.dtype);
  const OptTensor dh_b = two && b_live ? OptTensor(at::empty({c.n, c.hid}, c.dtype)) : std::nullopt;
  const at::Tensor acc = at::zeros({c.vocab, c.hid}, at::kFloat);
  if (chunk_ops) {
    const at::Tensor ws = at::empty({(two ? 2 : 1) * c.n * c.vocab}, at::kFloat);
    const auto s = chunk_forward(ws, ha, hb, w, t, c.temperature);
    chunk_backward(ws, ha, hb, w, t, s, g, dh_a, dh_b, acc, two && b_live, c.temperature);
  } else {
    const auto s = forward_stats(ha, hb, w, t, c.temperature, strategy, chunk_tokens, chunk_vocab);
    backward_grads(ha, hb, w, t, s, g, dh_a, dh_b, acc, two && b_live, c.temperature, strategy, chunk_tokens,
                   chunk_vocab);
  }
  // naive dh and dW
  const at::Tensor ha_d = ha.to(at::kDouble), w_d = w.to(at::kDouble);
  const at::Tensor hb_d = two ? hb->to(at::kDouble) : at::zeros_like(ha_d);
  const auto h_a = ha_d.accessor<double, 2>(), h_b = hb_d.accessor<double, 2>(), wt = w_d.accessor<double, 2>();
  std::vector<double> dw(c.vocab * c.hid, 0.0);
  const double tol = 5e-5;
  double scale = 0;  // dW's magnitude, for its absolute tolerance
  for (int64_t r = 0; r < c.n; ++r) {
    const int64_t target = t[r].item<int64_t>();
    if (target == -100) {
      expect(at::equal(dh_a[r], at::zeros({c.hid}, c.dtype)), tag + ": ignored row has dh_a = 0");
      continue;
    }
    std::vector<double> gr(6, 0.0);
    for (int i = 0; i < ng; ++i) gr[i] = gt[i][r].item<float>();
    std::vector<double> dza, dzb;
    naive_dz(naive_row(ha, hb, w, target, r, c.temperature), target, gr, two, c.temperature, dza, dzb);
    for (int64_t k = 0; k < c.hid; ++k) {
      double want_a = 0, want_b = 0;
      for (int64_t v = 0; v < c.vocab; ++v) {
        want_a += dza[v] * wt[v][k];
        want_b += dzb[v] * wt[v][k];
        double add = dza[v] * h_a[r][k];
        if (two && b_live) add += dzb[v] * h_b[r][k];
        dw[v * c.hid + k] += add;
      }
      const double half_tol = c.dtype == at::kFloat ? tol : 1e-2;  // dh is rounded to the input dtype
      expect(close(dh_a[r][k].item<float>(), want_a, half_tol), tag + ": dh_a row " + std::to_string(r));
      if (dh_b.has_value()) expect(close((*dh_b)[r][k].item<float>(), want_b, half_tol), tag + ": dh_b row " + std::to_string(r));
    }
  }
  for (double x : dw) scale = std::max(scale, std::fabs(x));
  for (int64_t v = 0; v < c.vocab; ++v) {
    for (int64_t k = 0; k < c.hid; ++k) {
      const double got = acc[v][k].item<float>(), want = dw[v * c.hid + k];
      expect(std::fabs(got - want) <= tol * (1 + scale), tag + ": dW[" + std::to_string(v) + "]");
    }
  }
}

void check_out_of_range_gradient(const char* strategy) {
  const std::string tag = std::string("out-of-range backward ") + strategy;
  const at::Tensor ha = at::randn({6, 8}), w = at::randn({11, 8});
  at::Tensor t = at::randint(0, 11, {6}, at::kLong);
  t[1] = 11;
  const auto s = forward_stats(ha, std::nullopt, w, t, 1.0, strategy, 4, 4);
  const at::Tensor dh = at::empty({6, 8}), acc = at::zeros({11, 8});
  backward_grads(ha, std::nullopt, w, t, s, {at::ones({6}), std::nullopt}, dh, std::nullopt, acc, false, 1.0,
                 strategy, 4, 4);
  expect(dh[1].isnan().all().item<bool>(), tag + ": its dh row is NaN");
  expect(!dh[0].isnan().any().item<bool>(), tag + ": other dh rows are finite");
  expect(acc.isnan().any().item<bool>(), tag + ": dW is NaN");
}

void expect_error(const std::function<void()>& call, const std::string& needle, const std::string& what) {
  try {
    call();
    expect(false, what + ": no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(needle) != std::string::npos, what + ": message names '" + needle + "': " + msg);
  }
}

void check_errors() {
  const at::Tensor ha = at::randn({4, 8}), w = at::randn({10, 8});
  const at::Tensor t = at::randint(0, 10, {4}, at::kLong);
  expect_error([&] { forward_stats(ha, at::randn({3, 8}), w, t, 1.0, "workspace", 4, 0); }, "hidden_b",
               "hidden_b of another shape");
  expect_error([&] { forward_stats(ha, std::nullopt, at::randn({10, 7}), t, 1.0, "workspace", 4, 0); }, "weight",
               "weight of another hidden size");
  expect_error([&] { forward_stats(ha, std::nullopt, w.to(at::kHalf), t, 1.0, "workspace", 4, 0); }, "weight",
               "weight of another dtype");
  expect_error([&] { forward_stats(ha, std::nullopt, w, t.to(at::kFloat), 1.0, "workspace", 4, 0); }, "targets",
               "float targets");
  expect_error([&] { forward_stats(ha, std::nullopt, w, t.narrow(0, 0, 3), 1.0, "workspace", 4, 0); }, "targets",
               "targets of another length");
  expect_error([&] { forward_stats(ha.to(at::kDouble), std::nullopt, w.to(at::kDouble), t, 1.0, "workspace", 4, 0); },
               "float64", "float64 inputs");
  expect_error([&] { forward_stats(ha, std::nullopt, w, t, 0.0, "workspace", 4, 0); }, "temperature",
               "zero temperature");
  expect_error([&] { forward_stats(ha, std::nullopt, w, t, 1.0, "blocks", 4, 0); }, "strategy", "unknown strategy");
  expect_error([&] { forward_stats(ha, std::nullopt, w, t, 1.0, "workspace", 0, 0); }, "chunk_tokens",
               "zero chunk_tokens");
  const auto s = forward_stats(ha, std::nullopt, w, t, 1.0, "workspace", 4, 0);
  expect_error([&] {
    backward_grads(ha, std::nullopt, w, t, s, {at::ones({4}), std::nullopt}, at::empty({4, 8}), std::nullopt,
                   at::zeros({10, 8}, at::kDouble), false, 1.0, "workspace", 4, 0);
  }, "weight_grad_acc", "float64 accumulator");
  expect_error([&] {
    backward_grads(ha, std::nullopt, w, t, s, {at::ones({3}), std::nullopt}, at::empty({4, 8}), std::nullopt,
                   std::nullopt, false, 1.0, "workspace", 4, 0);
  }, "grad_logp_a", "upstream gradient of another length");
  expect_error([&] {
    backward_grads(ha, std::nullopt, w, t, s, {at::ones({4}), std::nullopt}, at::empty({4, 9}), std::nullopt,
                   std::nullopt, false, 1.0, "workspace", 4, 0);
  }, "dh_a", "dh_a of another shape");
  expect_error([&] { chunk_forward(at::empty({10}), ha, std::nullopt, w, t, 1.0); }, "workspace",
               "workspace too small");
}

// The workspace epilogue ops (epilogue_ops.cpp) on CPU tensors run the CUDA kernels' host
// reference: registered in this library too, and consistent with ATen in double precision.
void check_epilogue_ops() {
  static auto stats_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("papo_kernels_C::epilogue_stats", "")
                             .typed<void(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&, double, int64_t)>();
  const at::Tensor z = at::randn({2 * 3, 37}) * 3;
  const at::Tensor za = z.narrow(0, 0, 3), zb = z.narrow(0, 3, 3);
  at::Tensor t = at::randint(0, 37, {3}, at::kLong);
  t[1] = -100;
  std::vector<at::Tensor> o;
  for (int i = 0; i < 8; ++i) o.push_back(at::full({3}, 7.0));
  stats_op.call(za, zb, t, o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], 0.5, -100);
  const at::Tensor want = at::logsumexp(za.to(at::kDouble) / 0.5, {1});
  for (int64_t r : {0, 2}) {
    expect(close(o[2][r].item<float>(), want[r].item<double>(), 1e-5), "epilogue_stats: lse_a row " + std::to_string(r));
  }
  for (int i = 0; i < 8; ++i) expect(o[i][1].item<float>() == 0.f, "epilogue_stats: an ignored row is exactly 0");
  expect_error([&] {
    stats_op.call(za, zb, t, o[0], o[1], o[2], std::nullopt, o[4], o[5], o[6], o[7], 1.0, -100);
  }, "logp_b", "epilogue_stats without logp_b for two views");
}

}  // namespace

int main() {
  at::manual_seed(0);
  Case c;
  for (const char* strategy : {"workspace", "tiles"}) {
    // chunk_tokens 4 (chunks of 4 rows + a tail), chunk_vocab 16 for the tiles (a tail of 13)
    const int64_t chunk_vocab = std::string(strategy) == "tiles" ? 16 : 0;
    for (bool two : {false, true}) {
      check_forward(c, two, strategy, 4, chunk_vocab);
      check_backward(c, two, true, strategy, 4, chunk_vocab, false);
    }
    check_backward(c, true, false, strategy, 4, chunk_vocab, false);
    Case half = c;
    half.dtype = at::kBFloat16;
    half.temperature = 1.3;
    check_forward(half, true, strategy, 5, chunk_vocab);
    check_backward(half, true, true, strategy, 5, chunk_vocab, false);
    check_out_of_range_gradient(strategy);
  }
  check_backward(c, true, true, "workspace", 0, 0, true);
  check_backward(c, true, false, "workspace", 0, 0, true);
  check_backward(c, false, true, "workspace", 0, 0, true);
  check_errors();
  check_epilogue_ops();
  std::printf("%s: %d of %d checks failed\n", failures == 0 ? "PASS" : "FAIL", failures, checks);
  return failures == 0 ? 0 : 1;
}
