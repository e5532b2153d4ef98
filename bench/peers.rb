# frozen_string_literal: true

require "rbconfig"
require "socket"

# How the benchmarks run this gem's peers: child processes under bench/Gemfile (the peers'
# gems, installed by `rake bench`, never needed by the test suite), with this gem's lib/
# first on the load path except for Grafana's gems, which own the same names.
module Peers
  module_function

  # BENCH_GEMFILE: another bundle with the gems the modes run need (the Ruby 3.3/3.4
  # chroot's, for modes none, profiled and wall)
  GEMFILE = ENV.fetch("BENCH_GEMFILE", File.expand_path("Gemfile", __dir__))
  LIB = File.expand_path("../lib", __dir__)

  # env and argv prefix for a child ruby of `mode`; sink: the URL peers upload to
  def command(mode, sink)
    env = { "BUNDLE_GEMFILE" => GEMFILE, "RUBYOPT" => "-rbundler/setup" }
    if mode == "datadog"
      # dd-trace-rb's profiler at its defaults; tracing off (the OTel SDK traces here)
      env.merge!("DD_PROFILING_ENABLED" => "true", "DD_TRACE_ENABLED" => "false", "DD_TRACE_AGENT_URL" => sink,
                 "DD_SERVICE" => "bench")
    end
    [env, [RbConfig.ruby, *(mode == "grafana" ? [] : ["-I", LIB])]]
  end

  # A stand-in agent/server: answers 200 to every request, keep-alive. Returns its URL.
  def start_sink
    server = TCPServer.new("127.0.0.1", 0)
    Thread.new do
      loop do
        Thread.new(server.accept) do |c|
          while (line = c.gets)
            length = 0
            until (line = c.gets).nil? || line == "\r\n"
              length = line.split(":", 2)[1].to_i if line.downcase.start_with?("content-length:")
            end
            c.read(length) if length.positive?
            c.write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
          end
        rescue IOError, SystemCallError
          nil
        ensure
          c.close
        end
      end
    end
    "http://127.0.0.1:#{server.addr[1]}"
  end
end
