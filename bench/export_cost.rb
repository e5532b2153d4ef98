# frozen_string_literal: true

# Export cost of one window, split by where it runs:
#   take + build       GVL: swap buffers, the sampler's buffer straight into the C export model
#   encode + gzip      no GVL: pprof with protobuf-c, zlib (what the uploader thread does)
# for a window sampled from a real run and for one of 5 000 distinct stacks of ~35 frames
# spread over 1 000 span ids (5 000 samples). Median of 5 runs each.
#   ruby -Ilib bench/export_cost.rb
require "pyroscope"
require_relative "support"

N = Pyroscope::Native
OPTS = [100, Dir.pwd, [], nil].freeze
def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)

# the GVL part (take the buffer straight into the export model) and the uploader's part
# (encode + gzip, off the GVL, on this thread's clock); [gvl ns, encode ns, gz bytes, samples]
def export_cost
  t0 = mono
  taken = N._take_model(OPTS)
  gvl = mono - t0
  c0 = Bench.thread_cpu
  bytes = N._encode_model(taken).sum(&:bytesize)
  [gvl, ((Bench.thread_cpu - c0) * 1e9).round, bytes, taken.samples]
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
end

# 5 000 distinct stacks (~35 frames) over 1 000 span ids: each stack a distinct path
# through ten methods under 25 frames of padding, recorded by the sampler itself at a label
# change (a boundary charge), so the export reads real frames.
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
end

rows = { "sampled (8 threads x 100 spans)" => [], "5 000 stacks x 1 000 span ids" => [] }
5.times do
  sampled_window
  rows.values[0] << export_cost
  recorded_window
  rows.values[1] << export_cost
end

puts "ruby #{RUBY_VERSION}: export cost per window, median of 5"
puts format("  %-34s %14s %16s %10s %9s", "window", "GVL (take+build)", "encode+gzip CPU", "gz bytes", "samples")
medians = rows.transform_values { |runs| runs.transpose.map { |xs| Bench.median(xs) } }
medians.each do |name, (gvl, enc, bytes, n)|
  puts format("  %-34s %13.2f ms %13.2f ms %10d %9d", name, gvl / 1e6, enc / 1e6, bytes, n)
end
gvl, enc, = medians.values[1]
Bench.report([
  { bench: "export", metric: "5 000 stacks × 1 000 span ids: GVL (take + build)", value: format("%.2f ms", gvl / 1e6) },
  { bench: "export", metric: "… encode + gzip, off the GVL", value: format("%.2f ms CPU", enc / 1e6) },
  { bench: "export", metric: "… total", value: format("%.2f ms", (gvl + enc) / 1e6), target: "≤ 10 ms",
    met: (gvl + enc) / 1e6 <= 10 },
])
