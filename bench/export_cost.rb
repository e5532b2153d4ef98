# frozen_string_literal: true

# Export cost of one window, split by where it runs:
#   take_window        GVL: swap buffers, frames to Ruby strings
#   model build        GVL: Ruby data to the C export model (Native.upload_stats[:export_gvl_ns])
#   encode + gzip      no GVL: pprof with protobuf-c, zlib (what the uploader thread does)
# for a window sampled from a real run and for a synthetic one of 5 000 distinct stacks of
# 30 frames spread over 1 000 span ids (5 000 samples). Median of 5 runs each.
#   ruby -Ilib bench/export_cost.rb
require "pyroscope"
require_relative "support"

N = Pyroscope::Native
OPTS = [100, Dir.pwd, [], nil].freeze
def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)
def median(xs) = xs.sort[xs.size / 2]

def cost(window)
  t0 = mono
  before = N.upload_stats[:export_gvl_ns]
  bytes = N._encode(window, OPTS).sum(&:bytesize)
  total = mono - t0
  build = N.upload_stats[:export_gvl_ns] - before
  [build, total - build, bytes]
end

# a real window: 8 threads, 40 methods, 100 spans each
40.times { |i| Object.define_method("work_#{i}") { |n| n.times.reduce(0) { |a, x| a + (x * i) % 7 } } }
def sampled_window
  N.start(sample_rate: 1000)
  Array.new(8) do |t|
    Thread.new do
      100.times do |s|
        N.set_labels({ "span_id" => format("%016x", (t << 32) | s), "span_name" => "route#{s % 5}" })
        4.times { |k| send("work_#{(t * 5 + s + k) % 40}", 2_000) }
        N.clear_labels
      end
    end
  end.each(&:join)
  N.stop
  t0 = mono
  w = N.take_window
  [w, mono - t0]
end

rows = { "sampled (8 threads x 100 spans)" => [], "synthetic (5 000 stacks x 1 000 span ids)" => [] }
5.times do
  w, take = sampled_window
  rows.values[0] << [take, *cost(w), w[:samples].size]
end
# A recorded window of 5 000 distinct stacks (~35 frames) over 1 000 span ids: each stack
# is a distinct path through ten methods under 25 frames of padding, recorded by the
# sampler itself at a label change (a boundary charge), so take_window sees real frames.
# (real methods: ten define_method blocks would share one block iseq, i.e. one frame)
def leaf(i) = N.set_labels({ "profile_id" => format("%016x", i % 1000), "span" => "route#{i % 20}" })
10.times do |d|
  Object.class_eval(<<~RUBY, __FILE__, __LINE__ + 1)
    def path#{d}(rest, i) = rest.empty? ? leaf(i) : send("path\#{rest[0]}", rest[1..], i)
  RUBY
end
def pad(n, i) = n.zero? ? send("path#{i % 10}", format("%04d", i).chars.map(&:to_i), i) : pad(n - 1, i)

def recorded_window
  N.start(sample_rate: 1) # timer samples are rare: the window is the 5 000 label-change charges
  5000.times { |i| pad(25, i) }
  N.clear_labels
  N.stop
  t0 = mono
  w = N.take_window
  [w, mono - t0]
end
5.times do
  w, take = recorded_window
  rows.values[1] << [take, *cost(w), w[:samples].size]
end

puts "ruby #{RUBY_VERSION}: export cost per window, median of 5 (ms)"
puts format("  %-42s %10s %12s %14s %10s %9s", "window", "take(GVL)", "build(GVL)", "encode+gzip", "gz bytes", "samples")
medians = rows.transform_values { |runs| runs.transpose.map { |xs| Bench.median(xs) } }
medians.each do |name, (take, build, enc, bytes, n)|
  puts format("  %-42s %10.2f %12.2f %14.2f %10d %9d", name, take / 1e6, build / 1e6, enc / 1e6, bytes, n)
end
take, build, enc, = medians.values[1]
Bench.report([
  { bench: "export", metric: "5 000 stacks × 1 000 span ids: GVL (take + build)", value: format("%.2f ms", (take + build) / 1e6) },
  { bench: "export", metric: "… encode + gzip, off the GVL", value: format("%.2f ms CPU", enc / 1e6) },
  { bench: "export", metric: "… total", value: format("%.2f ms", (take + build + enc) / 1e6), target: "≤ 10 ms",
    met: (take + build + enc) / 1e6 <= 10 },
])
