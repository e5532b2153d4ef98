# frozen_string_literal: true

# Profile type :wall against ground truth (issue 15, item 7): spans of 15 ms CPU, a 25 ms
# sleep and a ~20 ms blocking pipe read, with another thread hogging the GVL, traced with
# the real opentelemetry-sdk and this gem's span processor. For each span: its duration
# (the SDK's timestamps) against its wall total; the sleep and the read (measured around
# them, GVL waits included) against the wall under Kernel#sleep and IO#read; its thread CPU
# against its CPU. Ruby >= 3.2.
#   ruby -Ilib bench/wall_accuracy.rb [spans]
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "pyroscope"
require "pyroscope/otel"
require "opentelemetry/sdk"

abort "Ruby #{RUBY_VERSION}: profile type :wall needs Ruby >= 3.2" unless Pyroscope::Native::WALL_SUPPORTED

N = Pyroscope::Native
SPANS = Integer(ARGV.fetch(0, 12))
def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)

def compute(seconds)
  stop_at = cpu + seconds
  x = 0
  x += 1 while cpu < stop_at
  x
end

exporter = OpenTelemetry::SDK::Trace::Export::InMemorySpanExporter.new
provider = OpenTelemetry::SDK::Trace::TracerProvider.new
provider.add_span_processor(Pyroscope::Otel::SpanProcessor.new("wall.bench", "http://localhost:4040"))
provider.add_span_processor(OpenTelemetry::SDK::Trace::Export::SimpleSpanProcessor.new(exporter))
tracer = provider.tracer("bench")

# the other end of the pipe: a process (the hog cannot delay it), answering each byte ~20 ms later
reader, writer = IO.pipe
asks, ask_writer = IO.pipe
feeder = fork do
  reader.close
  ask_writer.close
  while asks.read(1)
    sleep 0.02
    writer.write("x")
  end
  exit!(0)
end
[writer, asks].each(&:close)

N.start(wall: true)
stop = false
hog = Thread.new { x = 0; x += 1 until stop }
truth = {}
SPANS.times do
  tracer.in_span("WallSpan") do |span|
    m = { cpu: cpu }
    compute(0.015)
    t = mono
    sleep 0.025
    m[:sleep] = mono - t
    ask_writer.write("?")
    t = mono
    reader.read(1)
    m[:read] = mono - t
    m[:cpu] = cpu - m[:cpu]
    truth[span.attributes["pyroscope.profile.id"]] = m
  end
end
stop = true
hog.join
ask_writer.close
Process.wait(feeder)
N.stop
samples = N.take_window[:samples]

worst = Hash.new(0.0)
puts format("Ruby %s, %d spans (ms: profiled / measured)", RUBY_VERSION, SPANS)
exporter.finished_spans.each do |span|
  id = span.attributes["pyroscope.profile.id"]
  m = truth.fetch(id)
  mine = samples.select { |_, labels, *| labels["profile_id"] == id }
  wall = ->(&pick) { mine.select { |frames, *| pick.call(frames.map(&:first)) }.sum { |s| s[4] } / 1e9 }
  got = { total: wall.call { true }, sleep: wall.call { |n| n.any? { |x| x.match?(/\AKernel[#.]sleep\z/) } },
          read: wall.call { |n| n.include?("IO#read") }, cpu: mine.sum { |s| s[2] } / 1e9,
          gvl: wall.call { |n| n.first == "(waiting for GVL)" } }
  want = m.merge(total: (span.end_timestamp - span.start_timestamp) / 1e9)
  %i[total sleep read cpu].each { |k| worst[k] = [worst[k], ((got[k] - want[k]) / want[k]).abs].max }
  puts format("  wall %6.1f / %6.1f   sleep %6.1f / %6.1f   read %6.1f / %6.1f   cpu %5.1f / %5.1f   (waiting for GVL) %6.1f",
              *%i[total sleep read cpu].flat_map { |k| [got[k] * 1e3, want[k] * 1e3] }, got[:gvl] * 1e3)
end
puts format("worst relative error: wall total %.2f %%, sleep %.2f %%, read %.2f %%, cpu %.2f %%",
            *%i[total sleep read cpu].map { |k| worst[k] * 100 })
