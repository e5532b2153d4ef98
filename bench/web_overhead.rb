# frozen_string_literal: true

# Threaded web overhead: bench/web_server.rb (Puma, 8 threads, OTel) without profiling and
# with this gem profiling it plus the span processor, under the same fixed load from this
# process (8 keep-alive clients for a fixed time), interleaved none, profiled, none, ...
# Prints requests/s and p50/p99 latency, and the profiled/none ratios: median (min–max).
#   ruby -Ilib bench/web_overhead.rb [pairs] [seconds per run]
require "net/http"
require "rbconfig"
require "tmpdir"
require_relative "support"

PAIRS = Integer(ARGV[0] || (Bench.quick? ? 2 : 5))
SECONDS = Float(ARGV[1] || (Bench.quick? ? 2 : 8))
CLIENTS = 8
SERVER = File.expand_path("web_server.rb", __dir__)
LIB = File.expand_path("../lib", __dir__)

def percentile(sorted, p) = sorted[[(sorted.size * p).ceil - 1, 0].max]

def run(mode, dir)
  io = IO.popen([RbConfig.ruby, "-I", LIB, SERVER, mode, dir], "r+")
  port = Integer(io.gets)
  latencies = Array.new(CLIENTS) { [] }
  Array.new(CLIENTS) { 1 }.each_with_index.map do |_, i|
    Thread.new do
      Net::HTTP.start("127.0.0.1", port) { |h| 20.times { |k| h.get("/warm?#{k}") } }
      sleep 0.2
      Net::HTTP.start("127.0.0.1", port) do |http|
        stop_at = Bench.mono + SECONDS
        k = i
        while (t = Bench.mono) < stop_at
          http.get("/rides?#{k += 1}")
          latencies[i] << Bench.mono - t
        end
      end
    end
  end.each(&:join)
  io.close_write
  server_cpu = Float(io.gets)
  sampler_cpu = Float(io.gets)
  io.read
  io.close
  all = latencies.flatten.sort
  { rps: all.size / SECONDS, p50: percentile(all, 0.5), p99: percentile(all, 0.99), cpu_per_req: server_cpu / all.size,
    sampler_share: sampler_cpu / server_cpu }
end

runs = Hash.new { |h, k| h[k] = [] }
Dir.mktmpdir("bench-web") do |dir|
  modes = ENV.fetch("WEB_MODES", "none,profiled").split(",")
  PAIRS.times { modes.each { |mode| runs[mode] << run(mode, dir) } }
end
ratios = ->(key) { runs["profiled"].zip(runs["none"]).map { |b, a| b[key] / a[key] } }
rps = ratios.call(:rps)
p99 = ratios.call(:p99)
ms = ->(mode, key) { format("%.2f ms", Bench.median(runs[mode].map { |r| r[key] }) * 1000) }
puts "Threaded web overhead, Ruby #{RUBY_VERSION}: Puma 8 threads + OTel SDK, #{CLIENTS} clients, " \
     "#{PAIRS} interleaved pairs of #{SECONDS} s"
Bench.report([
  { bench: "web", metric: "requests/s, none → profiled",
    value: "#{Bench.median(runs["none"].map { |r| r[:rps] }).round} → #{Bench.median(runs["profiled"].map { |r| r[:rps] }).round}" },
  { bench: "web", metric: "throughput ratio, profiled / none", value: Bench.spread(rps, 3), target: "≥ 0.99",
    met: Bench.median(rps) >= 0.99 },
  { bench: "web", metric: "server CPU per request (incl. start-up), none → profiled",
    value: "#{(Bench.median(runs["none"].map { |r| r[:cpu_per_req] }) * 1e6).round} µs → " \
           "#{(Bench.median(runs["profiled"].map { |r| r[:cpu_per_req] }) * 1e6).round} µs" },
  { bench: "web", metric: "sampler's own CPU, % of the profiled server's",
    value: Bench.spread(runs["profiled"].map { |r| r[:sampler_share] * 100 }, 3), target: "≤ 1 %",
    met: Bench.median(runs["profiled"].map { |r| r[:sampler_share] }) <= 0.01 },
  { bench: "web", metric: "p50 latency, none → profiled", value: "#{ms.call("none", :p50)} → #{ms.call("profiled", :p50)}" },
  { bench: "web", metric: "p99 latency, none → profiled", value: "#{ms.call("none", :p99)} → #{ms.call("profiled", :p99)}" },
  { bench: "web", metric: "p99 ratio, profiled / none", value: Bench.spread(p99, 3), target: "≤ 1.02",
    met: Bench.median(p99) <= 1.02 },
])
