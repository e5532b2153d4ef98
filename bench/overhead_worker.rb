# frozen_string_literal: true

# One timed run of the fixed CPU-bound workload for bench/sampler_overhead.rb, in its own
# process (this gem and stackprof both use SIGPROF, so each run gets a fresh process). Its
# cost is the process's CPU: Grafana's and Datadog's samplers run in threads of their own.
#   ruby -Ilib bench/overhead_worker.rb MODE ROUNDS        -> JSON on stdout
#     MODE: none, gem, stackprof, grafana (Grafana's `pyroscope` 1.x, without -Ilib),
#     datadog (dd-trace-rb's profiler, DD_* from the caller)
#   ruby -Ilib bench/overhead_worker.rb calibrate SECONDS  -> ROUNDS for ~SECONDS
require "json"

def fib(n) = n < 2 ? n : fib(n - 1) + fib(n - 2)

def workload(rounds)
  acc = 0
  rounds.times do |i|
    acc += fib(12) + [i, acc].max
    acc %= 1_000_003
  end
  acc
end

mode, arg = ARGV
cpu = -> { Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) }
if mode == "calibrate"
  t = cpu.call
  workload(20_000)
  puts (20_000 * Float(arg) / (cpu.call - t)).round
  exit
end

rounds = Integer(arg)
workload(rounds / 20) # warm-up
case mode
when "gem"
  require "pyroscope"
  Pyroscope::Native.start(sample_rate: 100)
when "stackprof"
  require "stackprof"
  StackProf.start(mode: :cpu, interval: 10_000) # µs: 100 Hz
when "grafana"
  require "pyroscope"
  Pyroscope.configure do |c|
    c.application_name = "bench.cpu"
    c.server_address = ENV.fetch("SINK")
  end
when "datadog" then require "datadog/profiling/preload"
when "loaded" then require "pyroscope" # the gem loaded, not sampling
when "none" then nil
else abort "mode: none, gem, stackprof, grafana or datadog"
end
c0 = cpu.call
w0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
workload(rounds)
c1 = cpu.call
w1 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
own_ns = 0
samples = case mode
          when "gem"
            Pyroscope::Native.stop
            own_ns = Pyroscope::Native.stats[:sampling_cpu_ns]
            Pyroscope::Native.take_window[:samples].sum { |s| s[3] }
          when "stackprof"
            StackProf.stop
            StackProf.results[:samples]
          else 0
          end
puts JSON.generate(cpu: c1 - c0, wall: w1 - w0, samples: samples, own_ns: own_ns)
