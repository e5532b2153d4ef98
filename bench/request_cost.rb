# frozen_string_literal: true

# A cost per request that holds on a noisy machine: bench/web_app.rb's app called
# in-process (no server, no sockets: only the app, the OTel SDK and the profiler) for a
# fixed number of requests, per mode, counted rather than timed:
#   - user-space instructions (valgrind --tool=callgrind), the difference between runs of
#     LONG and SHORT requests over the same start-up, so that loading costs nothing. Under
#     valgrind a thread's CPU runs ~50× slower, so its timers fire ~50× more per request:
#     the sampler runs there at 100 Hz / 50 so that samples land per request about as
#     they do natively at 100 Hz;
#   - system calls and signals (perf stat on the kernel's tracepoints), natively at 100 Hz,
#     the same difference of two runs;
#   - each priced with its unit cost measured here (bench/unit_cost.c), instructions at the
#     unprofiled run's CPU per instruction (the one timed number), to a modelled CPU cost
#     per request and its ratio to `none`.
#   ruby -Ilib bench/request_cost.rb            (COST_MODES=none,profiled,...)
#   ruby -Ilib bench/request_cost.rb worker MODE REQUESTS RATE   (one run; JSON on stdout)
require "json"
require "rbconfig"
require "tmpdir"
require_relative "support"
require_relative "peers"

if ARGV.first == "worker"
  require_relative "web_app"
  _, mode, requests, rate = ARGV
  app = Dir.mktmpdir("bench-cost") { |dir| WebApp.build(mode, dir, ENV.fetch("SINK", nil), sample_rate: Integer(rate), upload_interval: 3600) }
  env = { "REQUEST_METHOD" => "GET", "PATH_INFO" => "/rides", "QUERY_STRING" => "7" }
  100.times { app.call(env.dup) } # warm-up: first-time costs (method caches, kinds, buffers) in both runs
  GC.start
  cpu = Bench.thread_cpu
  Integer(requests).times { app.call(env.dup) }
  puts JSON.generate(cpu: Bench.thread_cpu - cpu, samples: defined?(Pyroscope::Native.stats) ? Pyroscope::Native.stats[:samples] : 0)
  $stdout.flush
  exit!(0) # no at-exit flush: its cost is not a request's
end

MODES = ENV.fetch("COST_MODES", "none,profiled,processor,sampler").split(",")
SHORT, LONG = Bench.quick? ? [20, 120] : [100, 600] # under valgrind
NATIVE_SHORT, NATIVE_LONG = Bench.quick? ? [100, 1100] : [500, 5500]
SLOWDOWN = 50
EVENTS = { "syscalls" => "raw_syscalls:sys_enter", "thread CPU clock reads" => "syscalls:sys_enter_clock_gettime",
           "timer re-arms" => "syscalls:sys_enter_timer_settime", "signals" => "signal:signal_deliver" }.freeze
SINK = Peers.start_sink

def worker(mode, requests, rate, prefix = [], env = {})
  penv, ruby = Peers.command(mode, SINK)
  out = IO.popen(penv.merge("SINK" => SINK).merge(env), [*prefix, *ruby, __FILE__, "worker", mode, requests.to_s, rate.to_s],
                 err: File::NULL, &:read)
  raise "#{mode}: worker failed" unless $?.success?

  JSON.parse(out.lines.last, symbolize_names: true)
end

def instructions(mode, requests, dir)
  file = File.join(dir, "callgrind.#{mode}.#{requests}")
  worker(mode, requests, 100 / SLOWDOWN, ["valgrind", "--tool=callgrind", "--callgrind-out-file=#{file}"])
  Integer(File.foreach(file).grep(/^(summary|totals):/).first.split[1])
end

def kernel_events(mode, requests, dir)
  file = File.join(dir, "perf.#{mode}.#{requests}")
  result = worker(mode, requests, 100, ["perf", "stat", "-x,", "-o", file, *EVENTS.values.flat_map { |e| ["-e", e] }])
  counts = File.readlines(file).filter_map do |l|
    value, _, event = l.split(",")
    [event, Integer(value)] if value =~ /\A\d+\z/
  end.to_h
  EVENTS.transform_values { |e| counts.fetch(e, 0) }.merge("cpu" => result[:cpu])
end

abort "valgrind not found (apt-get install valgrind)" unless system("valgrind --version", out: File::NULL)
units = Dir.mktmpdir("bench-unit") do |dir|
  exe = File.join(dir, "unit_cost")
  system("cc", "-O2", "-o", exe, File.join(__dir__, "unit_cost.c")) or abort "cannot build bench/unit_cost.c"
  JSON.parse(IO.popen([exe], &:read), symbolize_names: true)
end
per_request = Dir.mktmpdir("bench-cost") do |dir|
  MODES.to_h do |mode|
    ir = (instructions(mode, LONG, dir) - instructions(mode, SHORT, dir)).fdiv(LONG - SHORT)
    long = kernel_events(mode, NATIVE_LONG, dir)
    short = kernel_events(mode, NATIVE_SHORT, dir)
    events = long.to_h { |k, v| [k, (v - short[k]).fdiv(NATIVE_LONG - NATIVE_SHORT)] }
    [mode, events.merge("instructions" => ir)]
  end
end
ns_per_ir = per_request["none"]["cpu"] * 1e9 / per_request["none"]["instructions"]
model = per_request.transform_values do |c|
  clock = c["thread CPU clock reads"] * units[:thread_clock_ns]
  timer = c["timer re-arms"] * units[:timer_settime_ns]
  signals = c["signals"] * units[:signal_ns]
  other = (c["syscalls"] - c["thread CPU clock reads"] - c["timer re-arms"]) * units[:syscall_ns]
  c["instructions"] * ns_per_ir + clock + timer + signals + other
end
puts "Cost per request, Ruby #{RUBY_VERSION}: the app in-process, #{LONG - SHORT} requests under callgrind, " \
     "#{NATIVE_LONG - NATIVE_SHORT} natively; units: #{units.map { |k, v| "#{k} #{v}" }.join(", ")}, #{format("%.3f", ns_per_ir)} ns/instruction"
rows = [{ bench: "cost", metric: "unit prices, ns: thread CPU clock read; syscall; timer re-arm; signal",
          value: format("%.0f; %.0f; %.0f; %.0f", units[:thread_clock_ns], units[:syscall_ns], units[:timer_settime_ns], units[:signal_ns]) }]
MODES.each do |mode|
  c = per_request[mode]
  rows << { bench: "cost", metric: "#{mode}: instructions; syscalls (clock reads, timer re-arms); signals per request",
            value: format("%.0f; %.2f (%.2f, %.2f); %.3f", c["instructions"], c["syscalls"], c["thread CPU clock reads"],
                          c["timer re-arms"], c["signals"]) }
  next if mode == "none"

  rows << { bench: "cost", metric: "#{mode}: instructions per request, ratio to none",
            value: format("%.4f", c["instructions"] / per_request["none"]["instructions"]) }
  rows << { bench: "cost", metric: "#{mode}: modelled CPU per request, added µs; ratio to none",
            value: format("%+.1f; %.4f", (model[mode] - model["none"]) / 1e3, model[mode] / model["none"]),
            target: ("≤ 1.02" if mode == "profiled"), met: (model[mode] / model["none"] <= 1.02 if mode == "profiled") }
end
Bench.report(rows)
