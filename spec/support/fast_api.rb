# frozen_string_literal: true

require_relative "profile_helpers"
require_relative "workload"

# Issue 12's fast API: threads serving root spans of 1.5 / 3 / 6 ms CPU (routes drawn at
# random per request) through the real OpenTelemetry SDK and this gem's span processor,
# each span's CPU spent in Workload#find_nearest_<route>. It records the truth (thread CPU
# of each span and of each method call) and computes, from a window's samples, what the
# issue's goals are about. Shared by spec/attribution_spec.rb and bench/attribution.rb.
# Needs `require "pyroscope/otel"` first (not loaded by every spec).
class FastApi
  include ProfileHelpers

  ROUTES = { "bike" => 0.0015, "scooter" => 0.003, "car" => 0.006 }.freeze # CPU seconds per span
  Span = Struct.new(:id, :route, :cpu, :method_cpu) # CPU seconds: the span's (labelled), its method's

  attr_reader :spans

  def initialize
    provider = OpenTelemetry::SDK::Trace::TracerProvider.new
    # The truth of a span's CPU is the thread CPU between its labels' push and pop: marked by
    # two processors around this gem's (the SDK calls processors in the order added).
    provider.add_span_processor(CpuMark.new(:finish))
    provider.add_span_processor(Pyroscope::Otel::SpanProcessor.new("fast.api.cpu", "http://localhost:4040"))
    provider.add_span_processor(CpuMark.new(:start))
    @tracer = provider.tracer("fast-api")
    @work = Workload.new
    @spans = []
    @lock = Mutex.new
  end

  # Leaves on a span the thread CPU used since its labels were pushed (read at :finish).
  # A span processor by duck typing: the SDK need not be loaded with this file.
  class CpuMark
    def initialize(at) = @at = at
    def force_flush(timeout: nil) = OpenTelemetry::SDK::Trace::Export::SUCCESS # rubocop:disable Lint/UnusedMethodArgument
    def shutdown(timeout: nil) = OpenTelemetry::SDK::Trace::Export::SUCCESS # rubocop:disable Lint/UnusedMethodArgument

    def on_start(span, _parent_context)
      span.instance_variable_set(:@fast_api_cpu, now) if @at == :start
    end

    def on_finish(span)
      span.instance_variable_set(:@fast_api_cpu, now - span.instance_variable_get(:@fast_api_cpu)) if @at == :finish
    end

    private

    def now = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  end

  def self.handler(route) = "#{route.capitalize}Handler"

  # `threads` threads serve requests until each has used cpu_seconds of CPU.
  def run(threads: 2, cpu_seconds: 3.0, seed: 1)
    Array.new(threads) do |i|
      Thread.new do
        rng = Random.new(seed + i)
        served = []
        stop_at = thread_cpu + cpu_seconds
        served << serve(ROUTES.keys.sample(random: rng)) while thread_cpu < stop_at
        @lock.synchronize { @spans.concat(served) }
      end
    end.each(&:join)
    self
  end

  # One request. This method and its block run no code of their own (the clock reads
  # aside): CPU charged with either of them as the leaf is misplaced.
  def serve(route)
    method_cpu = nil
    span = @tracer.in_span(FastApi.handler(route)) do |s|
      started = thread_cpu
      @work.public_send(:"find_nearest_#{route}", ROUTES[route])
      method_cpu = thread_cpu - started
      s
    end
    Span.new(span.context.hex_span_id, route, span.instance_variable_get(:@fast_api_cpu), method_cpu)
  end

  def request_frame?(frame) = frame&.first&.end_with?("FastApi#serve") # also "block in FastApi#serve"

  # From a window's samples, as fractions:
  #   own_method:     per route, the share of its span CPU on stacks containing its method
  #   request_leaf:   the share of all span CPU with a request frame as the leaf
  #   total_error:    per route, (profiled span CPU - measured) / measured
  #   spans_with_cpu: the share of spans of >= 1 ms CPU that got any CPU
  def figures(samples)
    cpu = Hash.new(0)       # route => span CPU ns
    own = Hash.new(0)       # route => of which on stacks containing its method
    per_span = Hash.new(0)  # profile_id => CPU ns
    leaf = 0
    samples.each do |frames, labels, cpu_ns, _count|
      route = ROUTES.keys.find { |r| labels["span"] == FastApi.handler(r) } or next
      cpu[route] += cpu_ns
      own[route] += cpu_ns if on_stack?(frames, "find_nearest_#{route}")
      per_span[labels["profile_id"]] += cpu_ns
      leaf += cpu_ns if request_frame?(frames.first)
    end
    long = @spans.select { |s| s.cpu >= 0.001 }
    {
      own_method: ROUTES.keys.to_h { |r| [r, cpu[r].zero? ? 0.0 : own[r].fdiv(cpu[r])] },
      request_leaf: leaf.fdiv([cpu.values.sum, 1].max),
      total_error: ROUTES.keys.to_h { |r| [r, (cpu[r] / 1e9 / truth(r)) - 1] },
      spans_with_cpu: long.count { |s| per_span[s.id].positive? }.fdiv([long.size, 1].max),
    }
  end

  # Measured CPU of a route's spans, seconds.
  def truth(route) = @spans.sum { |s| s.route == route ? s.cpu : 0.0 }

  # The figures in one line per goal, with the truth beside them, for failure messages.
  def report(fig)
    pct = ->(x) { format("%.1f %%", x * 100) }
    routes = ROUTES.keys
    method_truth = routes.map { |r| pct.call(@spans.sum { |s| s.route == r ? s.method_cpu : 0.0 } / truth(r)) }
    <<~TEXT
      #{@spans.size} spans (#{routes.map { |r| "#{r} #{@spans.count { |s| s.route == r }}" }.join(", ")})
      under own method (goal >= 90 %): #{routes.map { |r| "#{r} #{pct.call(fig[:own_method][r])}" }.join(", ")} (true: #{method_truth.join(", ")})
      request frame as leaf (goal <= 3 %): #{pct.call(fig[:request_leaf])}
      per-route total error (goal within 10 %): #{routes.map { |r| "#{r} #{format("%+.1f %%", fig[:total_error][r] * 100)}" }.join(", ")}
      spans >= 1 ms with CPU (goal >= 99 %): #{pct.call(fig[:spans_with_cpu])}
    TEXT
  end
end
