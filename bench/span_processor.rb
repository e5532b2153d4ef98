# frozen_string_literal: true

# Span processor cost: the OTel SDK starting and finishing empty root spans with no
# processor (A), with this gem's processor and the sampler stopped (B), and with the
# sampler running at 100 Hz (C, what production pays: each label change also accounts the
# thread's CPU since its last sample). Runs interleaved A B C A B C ..., each timed by the
# thread's CPU clock; prints spans/s and the ns per span added, median (min..max).
#   ruby -Ilib bench/span_processor.rb [rounds] [spans per run]
require "pyroscope/otel"

ROUNDS = Integer(ARGV[0] || 7)
SPANS = Integer(ARGV[1] || 50_000)

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

def summary(values)
  sorted = values.sort
  format("%<m>.0f (%<lo>.0f..%<hi>.0f)", m: sorted[sorted.size / 2], lo: sorted.first, hi: sorted.last)
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

puts "Span processor cost, Ruby #{RUBY_VERSION}, #{ROUNDS} interleaved rounds of #{SPANS} root spans (thread CPU)"
puts format("  %-34s %s spans/s", "OTel SDK alone", summary(times[:sdk].map { |t| SPANS / t }))
%i[processor sampling].each do |k|
  added = times[k].zip(times[:sdk]).map { |b, a| (b - a) / SPANS * 1e9 }
  label = k == :processor ? "+ this processor (sampler stopped)" : "+ this processor, sampling 100 Hz"
  puts format("  %-34s %s spans/s, %s ns added per span", label, summary(times[k].map { |t| SPANS / t }), summary(added))
end
