# frozen_string_literal: true

# Attribution of short spans, at 100 Hz (issue 12): the fast API of spec/support/fast_api.rb
# (2 threads of root spans of 1.5 / 3 / 6 ms CPU through the OTel SDK and this gem's span
# processor, each span's CPU in its route's method) against the thread CPU measured for
# each span and method. Reports, per repeat: each route's span CPU under its own method, the
# span CPU with the request frame (which runs no code of its own) as leaf, the worst route's
# total error, the spans of >= 1 ms that got CPU, and the sampler's own CPU
# (stats[:sampling_cpu_ns]: timer samples' walks and aggregation) against the process's.
# Median (min–max).
#   ruby -Ilib bench/attribution.rb [repeats] [CPU seconds per thread] [sample rate]
require "pyroscope/otel"
require_relative "support"
require_relative "../spec/support/fast_api"

REPEATS = Integer(ARGV[0] || (Bench.quick? ? 2 : 5))
CPU_SECONDS = Float(ARGV[1] || (Bench.quick? ? 1.0 : 3.0))
RATE = Integer(ARGV[2] || 100)
N = Pyroscope::Native

runs = Array.new(REPEATS) do |i|
  api = FastApi.new
  sampling = N.stats[:sampling_cpu_ns]
  process = Bench.process_cpu
  N.start(sample_rate: RATE)
  api.run(threads: 2, cpu_seconds: CPU_SECONDS, seed: i)
  N.stop
  overhead = (N.stats[:sampling_cpu_ns] - sampling) / 1e9 / (Bench.process_cpu - process)
  api.figures(N.take_window[:samples]).merge(overhead: overhead)
end

pct = ->(xs) { Bench.spread(xs.map { |x| x * 100 }, 1) }
rows = FastApi::ROUTES.keys.map do |route|
  shares = runs.map { |r| r[:own_method][route] }
  { bench: "attribution", metric: "#{route} span CPU under its method, %", value: pct.call(shares),
    target: "≥ 90 %", met: Bench.median(shares) >= 0.90 }
end
leaf = runs.map { |r| r[:request_leaf] }
error = runs.map { |r| r[:total_error].values.map(&:abs).max }
with_cpu = runs.map { |r| r[:spans_with_cpu] }
overhead = runs.map { |r| r[:overhead] }
puts "Attribution of a fast API's spans, Ruby #{RUBY_VERSION}, #{REPEATS} repeats of 2 threads × #{CPU_SECONDS} s CPU at #{RATE} Hz"
Bench.report(rows + [
  { bench: "attribution", metric: "span CPU with the request frame as leaf, %", value: pct.call(leaf),
    target: "≤ 3 %", met: Bench.median(leaf) <= 0.03 },
  { bench: "attribution", metric: "span CPU total error, worst route, %", value: pct.call(error),
    target: "≤ 10 %", met: Bench.median(error) <= 0.10 },
  { bench: "attribution", metric: "spans ≥ 1 ms with CPU, %", value: pct.call(with_cpu),
    target: "≥ 99 %", met: Bench.median(with_cpu) >= 0.99 },
  { bench: "attribution", metric: "sampler CPU, % of process CPU", value: Bench.spread(overhead.map { |x| x * 100 }, 3),
    target: "≤ 1 %", met: Bench.median(overhead) <= 0.01 },
])
