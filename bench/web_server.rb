# frozen_string_literal: true

# The server of bench/web_overhead.rb: bench/web_app.rb's app in MODE on Puma with 8
# threads (WEB_THREADS). Prints its port; then each line read on stdin is answered with
# the process's CPU seconds (every thread's: peers sample from threads of their own) and
# this gem's own: sampling, exports and uploads (0 without it); serves until stdin closes.
#   ruby -Ilib bench/web_server.rb MODE DIR [SINK_URL]
require "puma"
require "puma/server"
require_relative "web_app"

mode, dir, sink = ARGV
app = WebApp.build(mode, dir, sink, sample_rate: Integer(ENV.fetch("WEB_SAMPLE_RATE", "100")), # 2 under valgrind (50x slower)
                                    upload_interval: Integer(ENV.fetch("WEB_UPLOAD_INTERVAL", "10")))
threads = Integer(ENV.fetch("WEB_THREADS", "8"))
server = Puma::Server.new(app, nil, min_threads: threads, max_threads: threads)
server.add_tcp_listener("127.0.0.1", 0)
server.run
$stdout.puts server.connected_ports.first
$stdout.flush
while $stdin.gets
  # this gem's own CPU: its samples, its exports and its uploads (Pyroscope.stats)
  # (nil before configure: the processor-only mode; no Stats: Grafana's gem)
  own = defined?(Pyroscope::Stats) ? Pyroscope.stats[:profiler_cpu_ns].to_i / 1e9 : 0
  $stdout.puts "#{Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)} #{own}"
  $stdout.flush
end
server.stop(true)
Pyroscope.shutdown if defined?(Pyroscope.shutdown)
