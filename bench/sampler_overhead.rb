# frozen_string_literal: true

# Sampling overhead at 100 Hz against the peers: a fixed CPU-bound Ruby workload (~5 s)
# with no profiler, with this gem's sampler, stackprof in CPU mode at the same interval,
# Grafana's `pyroscope` 1.x and dd-trace-rb's profiler at its defaults, run interleaved
# (none, gem, stackprof, grafana, datadog, none, ...) in fresh processes; each run's cost
# is its process's CPU time. Prints the ratios to the unprofiled run of the same round:
# median (min–max).
#   ruby -Ilib bench/sampler_overhead.rb [rounds] [seconds per run]   (OVERHEAD_MODES=none,gem)
require "json"
require_relative "support"
require_relative "peers"

ROUNDS = Integer(ARGV[0] || (Bench.quick? ? 3 : 7))
SECONDS = Float(ARGV[1] || (Bench.quick? ? 1 : 5))
WORKER = File.expand_path("overhead_worker.rb", __dir__)
MODES = ENV.fetch("OVERHEAD_MODES", "none,gem,stackprof,grafana,datadog").split(",")
NAMES = { "gem" => "this gem", "stackprof" => "stackprof (cpu mode)", "grafana" => "Grafana pyroscope 1.1.7",
          "datadog" => "dd-trace-rb 2.47 profiler, defaults" }.freeze

# Every run on the same CPU: unpinned, the same work was seen to take 1.2 s or 2.0 s
# depending on where the scheduler put the process, which drowned the ratios.
PIN = system("taskset -c 0 true", err: File::NULL) ? %w[taskset -c 1] : []
SINK = Peers.start_sink

def run(mode, arg)
  env, ruby = Peers.command(mode, SINK)
  out = IO.popen(env.merge("SINK" => SINK), [*PIN, *ruby, WORKER, mode, arg.to_s], err: File::NULL, &:read)
  raise "worker #{mode} failed" unless $?.success?

  out
end

rounds = Integer(run("calibrate", SECONDS))
runs = Hash.new { |h, k| h[k] = [] }
ROUNDS.times do
  MODES.each { |mode| runs[mode] << JSON.parse(run(mode, rounds), symbolize_names: true) }
end
ratio = ->(mode, key) { runs[mode].zip(runs["none"]).map { |b, a| b[key] / a[key] } }
gem_cpu = ratio.call("gem", :cpu)
puts "Sampling overhead at 100 Hz, Ruby #{RUBY_VERSION}: #{ROUNDS} interleaved rounds of ~#{SECONDS} s " \
     "(#{Bench.median(runs["none"].map { |r| r[:cpu] }).round(2)} s CPU unprofiled)"
peers = MODES - %w[none gem]
rows = (["gem"] + peers).flat_map do |mode|
  cpu = ratio.call(mode, :cpu)
  row = { bench: "overhead", metric: "process CPU ratio, #{NAMES[mode]} / none", value: Bench.spread(cpu) }
  if mode == "gem"
    row.merge!(target: "≤ 1.005 and below the peers",
               met: Bench.median(cpu) <= 1.005 && peers.all? { |p| Bench.median(cpu) < Bench.median(ratio.call(p, :cpu)) })
  end
  [row, { bench: "overhead", metric: "wall ratio, #{NAMES[mode]} / none", value: Bench.spread(ratio.call(mode, :wall)) }]
end
Bench.report(rows + [
  { bench: "overhead", metric: "this gem's own CPU per sample (its clock)",
    value: format("%.1f µs = %.3f %% of a busy thread at 100 Hz",
                  per_sample = Bench.median(runs["gem"].map { |r| r[:own_ns] / 1e3 / [r[:samples], 1].max }),
                  per_sample * 100 / 1e4) },
  { bench: "overhead", metric: "samples per run, this gem / stackprof",
    value: "#{Bench.median(runs["gem"].map { |r| r[:samples] })} / #{Bench.median(runs.fetch("stackprof", [{ samples: 0 }]).map { |r| r[:samples] })}" },
])
