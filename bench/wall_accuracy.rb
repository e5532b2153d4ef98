# frozen_string_literal: true

# Profile type :wall against ground truth (issue 15, item 7): spans of 15 ms CPU, a 25 ms
# sleep and a ~20 ms blocking pipe read, with another thread hogging the GVL, traced with
# the real opentelemetry-sdk and this gem's span processor. For each span: its duration
# (the SDK's timestamps) against its wall total; the sleep and the read (measured around
# them, GVL waits included) against the wall under Kernel#sleep and IO#read; its thread CPU
# against its CPU (the workload: spec/support/wall_spans.rb). Ruby >= 3.2.
#   ruby -Ilib bench/wall_accuracy.rb [spans]
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "pyroscope"
require "pyroscope/otel"
require "opentelemetry/sdk"
require_relative "../spec/support/wall_spans"

abort "Ruby #{RUBY_VERSION}: profile type :wall needs Ruby >= 3.2" unless Pyroscope::Native::WALL_SUPPORTED

N = Pyroscope::Native
SPANS = Integer(ARGV.fetch(0, 12))

spans = WallSpans.new("http://localhost:4040")
N.start(wall: true)
truth = spans.run(SPANS)
N.stop
samples = N.take_window[:samples]

worst = Hash.new(0.0)
puts format("Ruby %s, %d spans (ms: profiled / measured)", RUBY_VERSION, SPANS)
spans.finished.finished_spans.each do |span|
  id = span.attributes["pyroscope.profile.id"]
  mine = samples.select { |_, labels, *| labels["profile_id"] == id }
  got = WallSpans.profiled(mine.map { |frames, _, cpu_ns, _, wall_ns| [frames.map(&:first), cpu_ns, wall_ns] })
  want = truth.fetch(id).merge(total: (span.end_timestamp - span.start_timestamp) / 1e9)
  %i[total sleep read cpu].each { |k| worst[k] = [worst[k], ((got[k] - want[k]) / want[k]).abs].max }
  puts format("  wall %6.1f / %6.1f   sleep %6.1f / %6.1f   read %6.1f / %6.1f   cpu %5.1f / %5.1f   (waiting for GVL) %6.1f",
              *%i[total sleep read cpu].flat_map { |k| [got[k] * 1e3, want[k] * 1e3] }, got[:gvl] * 1e3)
end
puts format("worst relative error: wall total %.2f %%, sleep %.2f %%, read %.2f %%, cpu %.2f %%",
            *%i[total sleep read cpu].map { |k| worst[k] * 100 })
