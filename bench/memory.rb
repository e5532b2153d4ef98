# frozen_string_literal: true

# Memory: RSS after 1 000 000 distinct span ids (root spans through the real SDK and this
# gem's processor, sampled at 100 Hz, windows written to the local target every second),
# above the RSS after a warm-up; then the RSS slope of a steady run (spans, tags, thread
# churn) sampled every 5 s, over its second half.
# And, in a child process of its own (a fresh heap and fresh buffers), windows as a Rails
# app's: 5 000 distinct 200-frame stacks sharing their first 150 frames
# (spec/support/deep_stacks.rb), each recorded by a label change at its leaf, over and over
# for DEEP_SECONDS: the RSS growth over the same work unprofiled (both
# buffers filled: one written while the other is taken), the samples dropped, and the
# distinct deep stacks each full window kept.
#   ruby -Ilib bench/memory.rb [spans] [steady seconds]
require "logger"
require "tmpdir"
require "pyroscope"
require "pyroscope/otel"
require_relative "support"
require_relative "../spec/support/deep_stacks"

SPANS = Integer(ARGV[0] || (Bench.quick? ? 100_000 : 1_000_000))
STEADY = Float(ARGV[1] || ENV["BENCH_STEADY_SECONDS"] || (Bench.quick? ? 20 : 600))
DEEP_SECONDS = Bench.quick? ? 5 : 12

# [RSS growth KB, most samples a window dropped, distinct deep stacks of the fullest and the
# emptiest full window]
def deep_stacks_window
  reader, writer = IO.pipe
  pid = fork do
    reader.close
    pass = -> { DeepStacks.each(0...5000) { |i| Pyroscope::Native.set_labels({ "i" => i.to_s }) } }
    3.times { pass.call } # unprofiled: the methods, their caches, the label sets
    GC.start
    base = Bench.rss_kb
    dir = Dir.mktmpdir("bench-deep")
    Pyroscope.configure do |c|
      c.application_name = "bench.deep"
      c.server_address = "file://#{dir}"
      # max_samples and max_depth at their defaults; the timer slowed down so that each
      # stack's label change records it (timer samples, ~250/s here at most, would take
      # 20 s to cover 5 000 stacks once)
      c.sample_rate = 1
      c.upload_interval = 1
      c.local_max_bytes = 256 << 20
      c.logger = Logger.new(nil)
    end
    dropped = 0
    stop_at = Bench.mono + DEEP_SECONDS
    while Bench.mono < stop_at
      pass.call
      dropped = [dropped, Pyroscope::Native.stats[:window_dropped_samples]].max
    end
    GC.start
    grown = Bench.rss_kb - base
    Pyroscope.shutdown
    windows = Dir[File.join(dir, "*.pb.gz")].group_by { |f| File.basename(f)[/-(\d{8}T\d{6}Z)-/, 1] }
    deep = windows.sort.map(&:last)[1...-1].map do |parts| # the full windows, each maybe in several parts
      parts.flat_map { |f| Pyroscope::Native.read_pprof(File.binread(f))[:samples].map(&:first) }
           .select { |frames| frames.size >= 200 }.uniq.size
    end
    writer.write(JSON.generate([grown, dropped, deep.max, deep.min]))
    exit!(0)
  end
  writer.close
  result = JSON.parse(reader.read)
  Process.wait(pid)
  result
end

deep_kb, deep_dropped, deep_most, deep_least = deep_stacks_window

dir = Dir.mktmpdir("bench-memory")
Pyroscope.configure do |c|
  c.application_name = "bench.memory"
  c.server_address = "file://#{dir}"
  c.upload_interval = 1
  c.local_max_bytes = 32 << 20
  c.logger = Logger.new(nil)
end
provider = OpenTelemetry::SDK::Trace::TracerProvider.new
provider.add_span_processor(Pyroscope::Otel::SpanProcessor.new)
tracer = provider.tracer("bench")
work = ->(i) { (i % 50).times.sum { |k| k * i } }
spans = ->(n, offset = 0) { n.times { |i| tracer.in_span("route#{i % 20}") { work.call(i + offset) } } }

spans.call(20_000)
GC.start
base = Bench.rss_kb
t0 = Bench.mono
spans.call(SPANS, 20_000)
elapsed = Bench.mono - t0
sleep 1.5 # the last windows leave
GC.start
after = Bench.rss_kb
stats = Pyroscope::Native.upload_stats
grown = (after - base) / 1024.0
puts "Memory, Ruby #{RUBY_VERSION}: #{SPANS} distinct span ids in #{elapsed.round(1)} s, " \
     "#{stats[:windows_sent]} windows written, #{stats[:windows_dropped]} dropped"

rss = []
stop_at = Bench.mono + STEADY
k = 0
until Bench.mono > stop_at
  Thread.new { Pyroscope.tag_wrapper({ "job" => (k % 7).to_s }) { spans.call(2_000, k) } }.join
  k += 1
  if rss.empty? || Bench.mono - rss.last[0] >= 5
    GC.start
    rss << [Bench.mono, Bench.rss_kb]
  end
end
half = rss.drop(rss.size / 2)
mean_t = half.sum { |t, _| t } / half.size
mean_r = half.sum { |_, r| r } / half.size.to_f
slope = half.sum { |t, r| (t - mean_t) * (r - mean_r) } / half.sum { |t, _| (t - mean_t)**2 }.nonzero?.to_f
slope_mb_min = (slope.nan? ? 0 : slope) * 60 / 1024
Pyroscope.shutdown
FileUtils.rm_rf(dir)
Bench.report([
  { bench: "memory", metric: "RSS growth after #{SPANS} distinct span ids", value: format("%.1f MB", grown),
    target: "≤ 20 MB", met: grown <= 20 },
  { bench: "memory", metric: "RSS growth, windows of 5 000 distinct 200-frame stacks", value: format("%.1f MB", deep_kb / 1024.0),
    target: "≤ 20 MB", met: deep_kb <= 20 * 1024 },
  { bench: "memory", metric: "… samples dropped per window (most); distinct deep stacks per window",
    value: "#{deep_dropped}; #{deep_least}–#{deep_most}", target: "0; ≥ 5 000", met: deep_dropped.zero? && deep_least.to_i >= 5000 },
  { bench: "memory", metric: "RSS slope, steady #{STEADY.round} s (second half)",
    value: format("%+.2f MB/min (RSS %.0f → %.0f MB)", slope_mb_min, rss.first[1] / 1024.0, rss.last[1] / 1024.0),
    target: "flat", met: slope_mb_min < 0.5 }, # falling is no leak
])
