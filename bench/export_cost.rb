# frozen_string_literal: true

# Export cost of one window, split by where it runs:
#   take_window        GVL: swap buffers, frames to Ruby strings
#   model build        GVL: Ruby data to the C export model (Native.upload_stats[:export_gvl_ns])
#   encode + gzip      no GVL: pprof with protobuf-c, zlib (what the uploader thread does)
# for a window sampled from a real run and for a synthetic one of 5 000 distinct stacks
# under 10 span ids each (50 000 samples). Median of 5 runs each.
#   ruby -Ilib bench/export_cost.rb
require "pyroscope"

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

rows = { "sampled (8 threads x 100 spans)" => [], "synthetic (5 000 stacks x 10 spans)" => [] }
5.times do
  w, take = sampled_window
  rows.values[0] << [take, *cost(w), w[:samples].size]
end
# names and files are shared objects, as in a taken window
stacks = Array.new(5000) { |s| Array.new(30) { |d| [-"Mod#{d}::C#m#{(s * 7 + d) % 997}", -"/app/lib/f#{d}.rb", d + s % 50] }.freeze }
labels = Array.new(10) { |i| { "span_id" => format("%016x", i), "span_name" => "r#{i}" }.freeze }
now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
synthetic = { samples: stacks.product(labels).map { |st, l| [st, l, 10_000_000, 1] }, started_at_ns: now - 10**10, ended_at_ns: now }
5.times { rows.values[1] << [0, *cost(synthetic), synthetic[:samples].size] }

puts "ruby #{RUBY_VERSION}: export cost per window, median of 5 (ms)"
puts format("  %-38s %10s %12s %14s %10s %9s", "window", "take(GVL)", "build(GVL)", "encode+gzip", "gz bytes", "samples")
rows.each do |name, runs|
  take, build, enc, bytes, n = runs.transpose.map { |xs| median(xs) }
  puts format("  %-38s %10.2f %12.2f %14.2f %10d %9d", name, take / 1e6, build / 1e6, enc / 1e6, bytes, n)
end
