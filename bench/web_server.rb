# frozen_string_literal: true

# The server of bench/web_overhead.rb: a Rack app on Puma with 8 threads, instrumented
# with the OpenTelemetry SDK (a root span per request); with `profiled`, also profiled by
# this gem (local target) with its span processor. Prints its port, serves until stdin closes.
#   ruby -Ilib bench/web_server.rb none|profiled|sampler|processor DIR
#   (sampler: profiling without the span processor; processor: the processor, not sampling)
require "logger"
require "puma"
require "puma/server"
require "opentelemetry/sdk"

mode, dir = ARGV
ENV["OTEL_TRACES_EXPORTER"] = "none"
if mode != "none"
  require "pyroscope"
  require "pyroscope/otel"
end
if %w[profiled sampler].include?(mode)
  Pyroscope.configure do |c|
    c.application_name = "bench.web"
    c.server_address = "file://#{dir}"
    c.logger = Logger.new(nil)
  end
end
OpenTelemetry::SDK.configure do |c|
  c.service_name = "bench.web"
  c.logger = Logger.new(nil)
  c.add_span_processor(Pyroscope::Otel::SpanProcessor.new("bench.web.cpu", "http://localhost:4040")) if %w[profiled processor].include?(mode)
end
tracer = OpenTelemetry.tracer_provider.tracer("bench")

def handle(seed)
  rows = Array.new(60) { |i| Array.new(20) { |j| ((i * 31) + (j * seed)) % 101 } }
  rows.map(&:sort).flatten.each_slice(7).sum(&:max).to_s
end

app = lambda do |env|
  tracer.in_span("GET #{env["PATH_INFO"]}", kind: :server) do
    [200, { "content-type" => "text/plain" }, [handle(env["QUERY_STRING"].to_i)]]
  end
end
server = Puma::Server.new(app, nil, min_threads: 8, max_threads: 8)
server.add_tcp_listener("127.0.0.1", 0)
server.run
$stdout.puts server.connected_ports.first
$stdout.flush
$stdin.read
$stdout.puts Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) # the server's CPU, for CPU per request
# the sampler's own CPU (timer samples' walks and aggregation), for its share of the server's
$stdout.puts(defined?(Pyroscope::Native) ? Pyroscope::Native.stats[:sampling_cpu_ns] / 1e9 : 0)
$stdout.flush
server.stop(true)
Pyroscope.shutdown if mode != "none"
