# frozen_string_literal: true

require "json"

# What the benchmarks share: robust summaries of interleaved runs, and the rows each script
# hands to bench/run.rb (JSON to $BENCH_JSON) for the one table of `rake bench`.
module Bench
  module_function

  # BENCH_QUICK=1: fewer and shorter runs, for a smoke test of the scripts themselves.
  def quick? = ENV["BENCH_QUICK"] == "1"

  def median(xs) = xs.sort[xs.size / 2]

  # "1.0041 (0.9757–1.0136)": median (min–max)
  def spread(xs, digits = 4)
    s = xs.sort
    f = "%.#{digits}f"
    "#{format(f, median(s))} (#{format(f, s.first)}–#{format(f, s.last)})"
  end

  def thread_cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  def process_cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)
  def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  def rss_kb
    File.read("/proc/self/status")[/^VmRSS:\s+(\d+)/, 1].to_i
  end

  # rows: [{ bench:, metric:, value:, target:, met: }]; printed, and written for run.rb
  def report(rows)
    rows.each do |r|
      verdict = r[:met].nil? ? "" : (r[:met] ? "  [target met]" : "  [target missed]")
      puts format("  %-44s %s%s", r[:metric], r[:value], r[:target] ? "   target #{r[:target]}#{verdict}" : "")
    end
    path = ENV.fetch("BENCH_JSON", nil)
    File.write(path, JSON.generate(rows)) if path
  end
end
