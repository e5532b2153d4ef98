# frozen_string_literal: true

require_relative "profile_helpers"
require_relative "workload"

# Issue 15's ground truth for profile type :wall: root spans "WallSpan" through the real
# OpenTelemetry SDK and this gem's span processor that compute, sleep, then block on a pipe,
# while another thread hogs the GVL (so each sleep and read ends waiting for it). Each part
# is measured around itself, GVL waits included. The pipe's other end is a process, which
# the hog cannot delay. Shared by spec/wall_spec.rb and bench/wall_accuracy.rb.
# Needs `require "pyroscope/otel"` first (not loaded by every spec).
class WallSpans
  include ProfileHelpers

  SLEEP_FRAME = /\AKernel[#.]sleep\z/

  attr_reader :finished # the SDK's finished spans

  def initialize(endpoint)
    @finished = OpenTelemetry::SDK::Trace::Export::InMemorySpanExporter.new
    provider = OpenTelemetry::SDK::Trace::TracerProvider.new
    provider.add_span_processor(Pyroscope::Otel::SpanProcessor.new("wall.spans", endpoint))
    provider.add_span_processor(OpenTelemetry::SDK::Trace::Export::SimpleSpanProcessor.new(@finished))
    @tracer = provider.tracer("wall-spans")
    @work = Workload.new
  end

  # Runs `count` spans of `cpu` s of thread CPU, a `sleep` s sleep and a read answered
  # `read` s after it is asked for. Returns { profile id => { cpu:, sleep:, read: } } in
  # seconds, as measured.
  def run(count, cpu: 0.015, sleep: 0.025, read: 0.02)
    reader, writer = IO.pipe
    asks, ask_writer = IO.pipe
    feeder = fork do
      [reader, ask_writer].each(&:close)
      while asks.read(1)
        Kernel.sleep(read)
        writer.write("x")
      end
      exit!(0)
    end
    [writer, asks].each(&:close)
    stop = false
    hog = Thread.new { x = 0; x += 1 until stop } # pure Ruby: holds the GVL for whole time slices
    Array.new(count) { one(reader, ask_writer, cpu, sleep) }.to_h
  ensure
    stop = true
    hog&.join
    ask_writer&.close
    Process.wait(feeder) if feeder
    reader&.close
  end

  # What a profile says of one span, from its samples as [frame names leaf first, CPU ns,
  # wall ns]: seconds of wall in all, under Kernel#sleep, under IO#read, on the
  # "(waiting for GVL)" leaf, and its CPU.
  def self.profiled(samples)
    wall = ->(&pick) { samples.select { |names, *| pick.call(names) }.sum { |s| s[2] } / 1e9 }
    { total: wall.call { true }, sleep: wall.call { |n| n.any? { |x| x.match?(SLEEP_FRAME) } },
      read: wall.call { |n| n.include?("IO#read") }, gvl: wall.call { |n| n.first == "(waiting for GVL)" },
      cpu: samples.sum { |s| s[1] } / 1e9 }
  end

  private

  def one(reader, ask_writer, cpu, sleep)
    @tracer.in_span("WallSpan") do |span|
      m = { cpu: thread_cpu }
      @work.heavy(cpu)
      t = mono
      Kernel.sleep(sleep)
      m[:sleep] = mono - t
      ask_writer.write("?")
      t = mono
      reader.read(1)
      m[:read] = mono - t
      m[:cpu] = thread_cpu - m[:cpu]
      [span.attributes["pyroscope.profile.id"], m]
    end
  end

  def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC)
end
