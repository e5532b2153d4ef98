# frozen_string_literal: true

# Span processor cost: the OTel SDK starting and finishing empty root spans with no
# processor (A), with this gem's processor and the sampler stopped (B), and with the
# sampler running at 100 Hz (C, what production pays: each label change also accounts the
# thread's CPU since its last sample). Runs interleaved A B C A B C ..., each timed by the
# thread's CPU clock; prints spans/s and the ns per span added, median (min..max).
#   ruby -Ilib bench/span_processor.rb [rounds] [spans per run]
require "pyroscope/otel"
require_relative "support"

ROUNDS = Integer(ARGV[0] || (Bench.quick? ? 3 : 7))
SPANS = Integer(ARGV[1] || (Bench.quick? ? 10_000 : 50_000))

def tracer(*processors)
  provider = OpenTelemetry::SDK::Trace::TracerProvider.new
  processors.each { |p| provider.add_span_processor(p) }
  provider.tracer("bench")
end

def run(tracer)
  before = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  SPANS.times { tracer.in_span("GET /bikes") { nil } }
  Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) - before
end

clock_ns = begin
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  100_000.times { Pyroscope::Native.thread_cpu_ns }
  (Process.clock_gettime(Process::CLOCK_MONOTONIC) - t) / 100_000 * 1e9
end
plain = tracer
labelled = tracer(Pyroscope::Otel::SpanProcessor.new("bench.cpu", "http://localhost:4040"))
run(plain) && run(labelled) # warm-up

times = { sdk: [], processor: [], sampling: [] }
ROUNDS.times do
  times[:sdk] << run(plain)
  times[:processor] << run(labelled)
  Pyroscope::Native.start(sample_rate: 100)
  times[:sampling] << run(labelled)
  Pyroscope::Native.stop
  Pyroscope::Native.take_window
end

added = ->(k) { times[k].zip(times[:sdk]).map { |b, a| (b - a) / SPANS * 1e9 } }
puts "Span processor cost, Ruby #{RUBY_VERSION}, #{ROUNDS} interleaved rounds of #{SPANS} root spans (thread CPU)"
Bench.report([
  { bench: "spans", metric: "OTel SDK alone, spans/s", value: Bench.spread(times[:sdk].map { |t| SPANS / t }, 0) },
  { bench: "spans", metric: "+ processor, sampler stopped: ns/span added", value: Bench.spread(added.call(:processor), 0),
    target: "≤ 1 000 ns", met: Bench.median(added.call(:processor)) <= 1000 },
  { bench: "spans", metric: "+ processor, sampling 100 Hz: ns/span added", value: Bench.spread(added.call(:sampling), 0),
    target: "≤ 1 000 ns", met: Bench.median(added.call(:sampling)) <= 1000 },
  { bench: "spans", metric: "thread CPU clock read (2 per span when sampling)", value: format("%.0f ns", clock_ns) },
])
