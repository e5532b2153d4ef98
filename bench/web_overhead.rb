# frozen_string_literal: true

# Threaded web overhead against the peers: bench/web_server.rb (Puma, 8 threads, OTel SDK,
# a root span per request) in every mode (none, this gem, its processor only, its sampler
# only, Grafana's gems, dd-trace-rb's profiler), each under the same fixed load from `wrk`
# (1 thread, 8 keep-alive connections, one URL) for a fixed time after a 1 s warm-up,
# modes interleaved round by round in fresh servers, each round's order rotated. Per mode: the server's CPU per request
# (every thread's, measured by the server around the timed load), requests/s and p99, as
# median (min–max) over the rounds, and the ratio to `none` of the same round (pair).
#   ruby -Ilib bench/web_overhead.rb [rounds] [seconds per run]
#   WEB_MODES=none,profiled  WEB_WORK=8 (×0.7 ms CPU per request)  WEB_THREADS=32
require "tmpdir"
require_relative "support"
require_relative "peers"

ROUNDS = Integer(ARGV[0] || (Bench.quick? ? 2 : 5))
SECONDS = Integer(ARGV[1] || (Bench.quick? ? 2 : 8))
CONNECTIONS = 8
SERVER = File.expand_path("web_server.rb", __dir__)
WALL = Gem::Version.new(RUBY_VERSION) >= Gem::Version.new("3.2") # profile type :wall: GVL hand-over events
MODES = ENV.fetch("WEB_MODES", "none,profiled,#{"wall," if WALL}processor,sampler,grafana,datadog").split(",")
WRK = system("wrk --version", out: File::NULL, err: File::NULL) || $?.exitstatus == 1
warn "wrk not found (apt-get install wrk): the load comes from a Ruby process instead (Net::HTTP, keep-alive)" unless WRK

# The same load without wrk (the Ruby 3.3/3.4 chroot has none): CONNECTIONS keep-alive
# connections in a separate Ruby process, as fast as answered.
LOADGEN = <<~'RUBY'
  require "net/http"
  port, seconds, conns = ARGV.map { |a| Integer(a) }
  stop_at = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
  lat = Queue.new
  errors = Queue.new
  Array.new(conns) do
    Thread.new do
      Net::HTTP.start("127.0.0.1", port) do |http|
        while (t = Process.clock_gettime(Process::CLOCK_MONOTONIC)) < stop_at
          code = http.get("/rides?7").code
          errors << code unless code == "200"
          lat << Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
        end
      end
    end
  end.each(&:join)
  all = Array.new(lat.size) { lat.pop }.sort
  puts "#{all.size} #{all[(all.size * 0.99).floor] || 0} #{errors.size}"
RUBY

def wrk(port, seconds)
  unless WRK
    n, p99, errors = IO.popen([RbConfig.ruby, "-e", LOADGEN, port.to_s, seconds.to_s, CONNECTIONS.to_s], &:read).split
    return { requests: Integer(n), p99: Float(p99), errors: Integer(errors) }
  end
  out = IO.popen(["wrk", "-t1", "-c#{CONNECTIONS}", "-d#{seconds}s", "--latency", "http://127.0.0.1:#{port}/rides?7"], &:read)
  unit = { "us" => 1e-6, "ms" => 1e-3, "s" => 1.0, "m" => 60.0 }
  { requests: Integer(out[/(\d+) requests in/, 1]),
    p99: Float(out[/^\s+99%\s+([\d.]+)/, 1]) * unit.fetch(out[/^\s+99%\s+[\d.]+(\w+)/, 1]),
    errors: out[/Non-2xx or 3xx responses: (\d+)/, 1].to_i + out[/Socket errors: .*/].to_s.scan(/\d+/).sum(&:to_i) }
end

def run(mode, dir, sink)
  env, ruby = Peers.command(mode, sink)
  io = IO.popen(env, [*ruby, SERVER, mode, dir, sink], "r+", err: File::NULL)
  port = Integer(io.gets)
  wrk(port, 1)
  cpu = lambda do
    io.puts
    io.gets.split.map { |x| Float(x) }
  end
  cpu0, own0 = cpu.call
  load = wrk(port, SECONDS)
  cpu1, own1 = cpu.call
  io.close_write
  io.read
  io.close
  # failed requests (wrk's timeouts under load: one in ~20 000 for a peer) are reported, not fatal
  { cpu_per_req: (cpu1 - cpu0) / load[:requests], rps: load[:requests].fdiv(SECONDS), p99: load[:p99],
    own_share: (own1 - own0) / (cpu1 - cpu0), errors: load[:errors] }
end

runs = Hash.new { |h, k| h[k] = [] }
sink = Peers.start_sink
Dir.mktmpdir("bench-web") do |dir|
  # each round starts one mode further on: a fixed order measured `none` first every round,
  # and the position in a round biased the pairs (every mode 1.12–1.19× `none` in one run,
  # dd-trace-rb's profiler and this gem's idle processor included)
  ROUNDS.times { |r| MODES.rotate(r).each { |mode| runs[mode] << run(mode, dir, sink) } }
end
ratio = ->(mode, key) { runs[mode].zip(runs["none"]).map { |b, a| b[key] / a[key] } }
spread = ->(xs, f = 0) { Bench.spread(xs, f) }
NAMES = { "none" => "none (OTel SDK)", "loaded" => "this gem loaded, unused", "profiled" => "this gem (sampler + processor + tag_wrapper)",
          "wall" => "this gem, profile_types [:cpu, :wall]", "processor" => "this gem, processor only", "sampler" => "this gem, sampler + tag_wrapper only",
          "grafana" => "Grafana pyroscope 1.1.7 + pyroscope-otel 0.2.0", "datadog" => "dd-trace-rb 2.47 profiler, defaults" }.freeze
work = Integer(ENV.fetch("WEB_WORK", "1"))
threads = Integer(ENV.fetch("WEB_THREADS", "8"))
tag = work == 1 && threads == 8 ? "web" : "web ×#{work} work, #{threads} threads"
puts "Threaded web overhead, Ruby #{RUBY_VERSION}: Puma #{threads} threads + OTel SDK, wrk #{CONNECTIONS} connections, " \
     "#{ROUNDS} interleaved rounds of #{SECONDS} s"
rows = MODES.flat_map do |mode|
  r = runs[mode]
  row = [{ bench: tag, metric: "#{NAMES[mode]}: CPU µs/request",
           value: spread.call(r.map { |x| x[:cpu_per_req] * 1e6 }, 0) }]
  unless mode == "none"
    cpu = ratio.call(mode, :cpu_per_req)
    met = (Bench.median(cpu) <= 1.02 && %w[grafana datadog].all? { |p| !runs.key?(p) || Bench.median(cpu) < Bench.median(ratio.call(p, :cpu_per_req)) } if mode == "profiled")
    row << { bench: tag, metric: "… CPU/request ratio to none", value: spread.call(cpu, 3),
             target: ("≤ 1.02, below the peers" if mode == "profiled"), met: met }
  end
  errors = r.sum { |x| x[:errors] }
  row << { bench: tag, metric: "… requests/s; p99 ms#{"; failed requests" if errors.positive?}",
           value: "#{spread.call(r.map { |x| x[:rps] })}; #{spread.call(r.map { |x| x[:p99] * 1e3 }, 2)}#{"; #{errors}" if errors.positive?}" }
  row
end
if runs.key?("wall") && runs.key?("profiled") # what wall time adds, paired round by round
  extra = runs["wall"].zip(runs["profiled"]).map { |w, c| (w[:cpu_per_req] / c[:cpu_per_req]) - 1 }
  rows << { bench: tag, metric: "[:cpu, :wall] beyond [:cpu]: % of the server's CPU per request",
            value: spread.call(extra.map { |x| x * 100 }, 2), target: "≤ 1 %", met: Bench.median(extra) <= 0.01 }
end
if runs.key?("profiled")
  rows << { bench: tag, metric: "this gem's own CPU (sampling, exports, uploads), % of the server's",
            value: spread.call(runs["profiled"].map { |x| x[:own_share] * 100 }, 3), target: "≤ 1 %",
            met: Bench.median(runs["profiled"].map { |x| x[:own_share] }) <= 0.01 }
end
Bench.report(rows)
