# frozen_string_literal: true

# Accuracy against ground truth, at 100 Hz: (1) three functions burning known shares
# (50/30/20 %) of one thread's CPU in random-sized slices: each function's profiled share
# minus its measured share; (2) 1 000 spans of 1–3 ms CPU: each span's profiled CPU
# against the thread's measured CPU for it. Repeated; median (min–max).
#   ruby -Ilib bench/accuracy.rb [repeats]
require "pyroscope"
require_relative "support"

REPEATS = Integer(ARGV[0] || (Bench.quick? ? 2 : 5))
N = Pyroscope::Native

def burn(seconds)
  stop_at = Bench.thread_cpu + seconds
  x = 0
  x += 1 while Bench.thread_cpu < stop_at
  x
end

def alpha(s) = burn(s)
def beta(s) = burn(s)
def gamma(s) = burn(s)

def functions_error
  truth = Hash.new(0.0)
  rng = Random.new(42)
  N.start(sample_rate: 100)
  200.times do
    { alpha: 0.5, beta: 0.3, gamma: 0.2 }.each do |fn, share|
      t = Bench.thread_cpu
      send(fn, share * rng.rand(0.002..0.018))
      truth[fn] += Bench.thread_cpu - t
    end
  end
  N.stop
  profiled = Hash.new(0)
  N.take_window[:samples].each do |frames, _, cpu, _|
    fn = frames.map(&:first).find { |name| name =~ /#(alpha|beta|gamma)\z/ }
    profiled[fn[/\w+\z/].to_sym] += cpu if fn
  end
  total_t = truth.values.sum
  total_p = profiled.values.sum.to_f
  truth.keys.map { |fn| ((profiled[fn] / total_p) - (truth[fn] / total_t)).abs * 100 }.max
end

def spans_error
  measured = {}
  N.start(sample_rate: 100)
  1000.times do |i|
    N.set_labels({ "span" => i.to_s })
    t = Bench.thread_cpu
    burn(0.001 + (i % 21) * 0.0001)
    measured[i.to_s] = Bench.thread_cpu - t
    N.clear_labels
  end
  N.stop
  profiled = Hash.new(0)
  N.take_window[:samples].each { |_, labels, cpu, _| profiled[labels["span"]] += cpu if labels["span"] }
  errors = measured.map { |id, cpu| ((profiled[id] / 1e9) - cpu).abs / cpu }.sort
  [Bench.median(errors) * 100, errors[(errors.size * 0.95).floor] * 100, measured.count { |id, _| profiled[id].positive? }]
end

fn = Array.new(REPEATS) { functions_error }
sp = Array.new(REPEATS) { spans_error }
puts "Accuracy, Ruby #{RUBY_VERSION}, #{REPEATS} repeats at 100 Hz"
Bench.report([
  { bench: "accuracy", metric: "per-function share error (max of 3), pts", value: Bench.spread(fn, 2) },
  { bench: "accuracy", metric: "per-span CPU error, median span, %", value: Bench.spread(sp.map { |m, _, _| m }, 2) },
  { bench: "accuracy", metric: "per-span CPU error, 95th pct span, %", value: Bench.spread(sp.map { |_, p, _| p }, 2) },
  { bench: "accuracy", metric: "spans of 1–3 ms with CPU, of 1 000", value: sp.map { |_, _, n| n }.minmax.join("–") },
])
