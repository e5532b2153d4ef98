# frozen_string_literal: true

# Sampling overhead: a fixed CPU-bound Ruby workload run with the sampler stopped (A) and
# started at 100 Hz (B), interleaved A B A B ... in one process, each run timed by the
# thread's CPU clock (the handler runs on the sampled thread, so its cost is in it) and by
# the wall clock. Prints the median, min and max of the B/A ratios.
#   ruby -Ilib bench/sampler_overhead.rb [pairs] [rounds]
require "pyroscope"

PAIRS = Integer(ARGV[0] || 7)
ROUNDS = Integer(ARGV[1] || 200_000)

def fib(n) = n < 2 ? n : fib(n - 1) + fib(n - 2)

def workload
  acc = 0
  ROUNDS.times do |i|
    acc += fib(12) + [i, acc].max
    acc %= 1_000_003
  end
  acc
end

def timed
  cpu0 = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  wall0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  [Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) - cpu0, Process.clock_gettime(Process::CLOCK_MONOTONIC) - wall0]
end

def stats(values)
  sorted = values.sort
  { median: sorted[sorted.size / 2], min: sorted.first, max: sorted.last }
end

workload # warm-up
ratios = { cpu: [], wall: [] }
base_cpu = []
samples = 0
PAIRS.times do
  a = timed { workload }
  Pyroscope::Native.start(sample_rate: 100)
  b = timed { workload }
  Pyroscope::Native.stop
  samples += Pyroscope::Native.take_window[:samples].sum { |s| s[3] }
  base_cpu << a[0]
  ratios[:cpu] << b[0] / a[0]
  ratios[:wall] << b[1] / a[1]
end

stats_now = Pyroscope::Native.stats
per_sample = stats_now[:sampling_cpu_ns].to_f / stats_now[:samples]
puts format("ruby %s, %d pairs, unprofiled run %.2f s CPU, %d samples taken in the profiled runs",
            RUBY_VERSION, PAIRS, stats(base_cpu)[:median], samples)
puts format("  sampler's own CPU per sample (stack walk + aggregation): %.1f us, %.4f%% of a thread's CPU at 100 Hz",
            per_sample / 1000, per_sample * 100 / 1e9 * 100)
ratios.each do |kind, values|
  s = stats(values)
  puts format("  %-4s ratio profiled/unprofiled: median %.4f  (min %.4f, max %.4f)", kind, s[:median], s[:min], s[:max])
end
