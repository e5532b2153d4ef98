# frozen_string_literal: true

# Sampling overhead at 100 Hz: a fixed CPU-bound Ruby workload (~5 s) with no profiler,
# with this gem's sampler, and with stackprof in CPU mode at the same interval, run
# interleaved (none, gem, stackprof, none, ...) in fresh processes; each run's cost is
# its thread's CPU time. Prints the ratios to the unprofiled run: median (min–max).
#   ruby -Ilib bench/sampler_overhead.rb [triples] [seconds per run]
require "rbconfig"
require_relative "support"

TRIPLES = Integer(ARGV[0] || (Bench.quick? ? 3 : 7))
SECONDS = Float(ARGV[1] || (Bench.quick? ? 1 : 5))
WORKER = File.expand_path("overhead_worker.rb", __dir__)
LIB = File.expand_path("../lib", __dir__)

# Every run on the same CPU: unpinned, the same work was seen to take 1.2 s or 2.0 s
# depending on where the scheduler put the process, which drowned the ratios.
PIN = system("taskset -c 0 true", err: File::NULL) ? %w[taskset -c 1] : []

def run(*args)
  out = IO.popen([*PIN, RbConfig.ruby, "-I", LIB, WORKER, *args.map(&:to_s)], &:read)
  raise "worker #{args.first} failed" unless $?.success?

  out
end

rounds = Integer(run("calibrate", SECONDS))
runs = Hash.new { |h, k| h[k] = [] }
TRIPLES.times do
  %w[none gem stackprof].each { |mode| runs[mode] << JSON.parse(run(mode, rounds), symbolize_names: true) }
end
ratio = ->(mode, key) { runs[mode].zip(runs["none"]).map { |b, a| b[key] / a[key] } }
gem_cpu = ratio.call("gem", :cpu)
sp_cpu = ratio.call("stackprof", :cpu)
puts "Sampling overhead at 100 Hz, Ruby #{RUBY_VERSION}: #{TRIPLES} interleaved triples of ~#{SECONDS} s " \
     "(#{Bench.median(runs["none"].map { |r| r[:cpu] }).round(2)} s CPU unprofiled)"
Bench.report([
  { bench: "overhead", metric: "CPU ratio, this gem / none", value: Bench.spread(gem_cpu),
    target: "≤ 1.005 and below stackprof", met: Bench.median(gem_cpu) <= 1.005 && Bench.median(gem_cpu) < Bench.median(sp_cpu) },
  { bench: "overhead", metric: "CPU ratio, stackprof (cpu mode) / none", value: Bench.spread(sp_cpu) },
  { bench: "overhead", metric: "wall ratio, this gem / none", value: Bench.spread(ratio.call("gem", :wall)) },
  { bench: "overhead", metric: "wall ratio, stackprof / none", value: Bench.spread(ratio.call("stackprof", :wall)) },
  { bench: "overhead", metric: "this gem's own CPU per sample (its clock)",
    value: format("%.1f µs = %.3f %% of a busy thread at 100 Hz",
                  per_sample = Bench.median(runs["gem"].map { |r| r[:own_ns] / 1e3 / [r[:samples], 1].max }),
                  per_sample * 100 / 1e4) },
  { bench: "overhead", metric: "samples per run, this gem / stackprof",
    value: "#{Bench.median(runs["gem"].map { |r| r[:samples] })} / #{Bench.median(runs["stackprof"].map { |r| r[:samples] })}" },
])
