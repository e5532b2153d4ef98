# frozen_string_literal: true

require "logger"
require "stringio"

RSpec.describe Pyroscope::Exporter do
  let(:native) { Pyroscope::Native }
  let(:work) { Workload.new }
  let(:receiver) { ContractReceiver.new(base_path: "/prefix") }
  let(:log) { StringIO.new }
  let(:options) { {} }
  let(:exporter) do
    described_class.new(application_name: "spec.app", server_address: receiver.url, logger: Logger.new(log),
                        connect_timeout: 1, timeout: 2, **options)
  end

  before { exporter } # configures the uploader: headers, timeouts, caps

  after do
    receiver.close
    native.flush(2)
    native.upload_events # drained here: an example's events are its own log's, not the next one's
  end

  # a window made by hand: its samples are known exactly
  def window(samples)
    now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
    { samples: samples, started_at_ns: now - 1_000_000_000, ended_at_ns: now, dropped_samples: 0, dropped_cpu_ns: 0 }
  end

  def frames(*names) = names.map { |n| [n, "#{Dir.pwd}/app/#{n.downcase}.rb", 3] }

  def enqueue(win)
    native._enqueue(win, [100, Dir.pwd, [], nil], "#{receiver.url}/ingest?name=spec.app&from=#{Time.now.to_i / 10 * 10}" \
                                                   "&until=#{Time.now.to_i / 10 * 10 + 10}&format=pprof&sampleRate=100&spyName=rbspy",
                    "#{receiver.url}/ingest")
  end

  it "delivers what was sampled: stacks, labels and CPU, within the contract" do
    sent_before = native.upload_stats[:windows_sent]
    native.start
    native.set_labels({ "span" => "BikeHandler" })
    before = thread_cpu
    work.heavy(0.3)
    spent = thread_cpu - before
    native.clear_labels
    exporter.stop(timeout: 5)
    native.stop
    received = receiver.wait_for(1)
    expect(receiver.violations).to be_empty
    bike = receiver.samples.select { |s| s[:labels]["span"] == "BikeHandler" }
    expect(bike.sum { |s| s[:cpu_ns] } / 1e9).to be_within(0.1 * spent).of(spent)
    leafish = bike.flat_map { |s| s[:frames] }.find { |name, *| name == "Workload#heavy" }
    expect(leafish).to eq(["Workload#heavy", "spec/support/workload.rb", 7]) # app root stripped
    expect(received.first[:params]).to include("name" => "spec.app", "format" => "pprof", "sampleRate" => "100")
    expect(native.upload_stats[:windows_sent]).to eq(sent_before + 1)
  end

  # Samples a full buffer dropped were counted, but their CPU was in no profile: totals fell
  # short by as much (here most of the window).
  context "with global tags" do
    let(:options) { { tags: { "env" => "spec" } } }

    it "delivers what a full buffer dropped on a (dropped) frame, so that the profile's total is the CPU spent" do
      native.start(max_samples: 16, sample_rate: 1000)
      before = thread_cpu
      40.times do |i|
        native.set_labels({ "i" => i.to_s })
        work.heavy(0.003)
      end
      native.clear_labels
      spent = thread_cpu - before
      native.stop
      dropped_ns = native.stats[:window_dropped_cpu_ns]
      exporter.stop(timeout: 5)
      receiver.wait_for(1)
      expect(receiver.violations).to be_empty
      dropped = receiver.samples.select { |s| s[:frames].map(&:first) == ["(dropped)"] }
      expect(dropped_ns).to be > 0
      # no labels of its own (the dropped samples' are not known), the process's tags
      expect(dropped.map { |s| [s[:cpu_ns], s[:labels]] }).to eq([[dropped_ns, { "env" => "spec" }]])
      expect(receiver.samples.sum { |s| s[:cpu_ns] } / 1e9).to be_within(0.1 * spent).of(spent)
    end
  end

  it "encodes a taken window's (dropped) sample, so that the profile's total is the window's" do
    window = overflowed_window
    samples = native._encode(window, [100, Dir.pwd, [], nil]).flat_map do |gz|
      PprofDecoder.samples(PprofDecoder.decode(PprofDecoder.gunzip(gz)))
    end
    dropped = samples.select { |s| s[:frames].map(&:first) == ["(dropped)"] }
    expect(window[:dropped_cpu_ns]).to be > 0
    expect(dropped.map { |s| [s[:cpu_ns], s[:labels]] }).to eq([[window[:dropped_cpu_ns], {}]])
    expect(samples.sum { |s| s[:cpu_ns] }).to eq(window[:samples].sum { |s| s[2] })
  end

  context "with credentials and a tenant" do
    let(:options) { { auth_token: "s3cret-token", tenant_id: "team-a", http_headers: { "X-Extra" => "1" } } }

    it "sends them as headers and never logs them" do
      receiver.expect_auth = "Bearer s3cret-token"
      receiver.expect_tenant = "team-a"
      native.start
      work.heavy(0.05)
      exporter.stop(timeout: 5)
      receiver.wait_for(1)
      expect(receiver.violations).to be_empty
      expect(receiver.accepted.first[:headers]["x-extra"]).to eq("1")
      receiver.mode = [:status, 500]
      native.start
      work.heavy(0.05)
      exporter.stop(timeout: 1)
      expect(log.string).to include("HTTP 500")
      expect(log.string).not_to include("s3cret")
    end
  end

  it "keeps label values byte for byte, whatever they contain" do
    values = ["a=b,c", "{x}", "quote \" and ' ", "naïve ☃ 日本", "", "k=v}{,"]
    samples = values.each_with_index.map { |v, i| [frames("Handler#call"), { "v" => v, "i" => i.to_s }, 1_000_000, 1] }
    enqueue(window(samples))
    receiver.wait_for(1)
    expect(receiver.violations).to be_empty
    got = receiver.samples.to_h { |s| [s[:labels]["i"], s[:labels]["v"]] }
    expect(got).to eq(values.each_with_index.to_h { |v, i| [i.to_s, v] })
  end

  it "sanitizes label names to the server's grammar" do
    enqueue(window([[frames("A#b"), { "span name" => "x", "ok.name_1" => "y", "日本" => "z" }, 1_000, 1]]))
    receiver.wait_for(1)
    expect(receiver.violations).to be_empty
    expect(receiver.samples.first[:labels]).to eq("span_name" => "x", "ok.name_1" => "y", "______" => "z")
  end

  context "with a receiver slow to decode 16 000 samples (a loaded CI machine)" do
    # a POST that outlives the 2 s timeout is retried, and the receiver, which had it,
    # counts it twice (seen at a load average of 20)
    let(:options) { { timeout: 30 } }

    it "splits a window of 50 000 label sets within the server's limits and delivers all of it" do
      stack = frames("Server#handle", "App#call", "Rack#call")
      samples = Array.new(50_000) { |i| [stack, { "span_id" => format("%016x", i), "span_name" => "route#{i % 7}" }, 1000 + i, 1] }
      enqueue(window(samples))
      received = receiver.wait_for(4)
      expect(receiver.violations).to be_empty
      expect(received.map { |r| r[:samples].size }).to all(be <= 16_000)
      got = receiver.samples
      expect(got.size).to eq(50_000)
      expect(got.map { |s| s[:labels]["span_id"] }.uniq.size).to eq(50_000)
      expect(got.sum { |s| s[:cpu_ns] }).to eq(samples.sum { |s| s[2] })
    end
  end

  it "cuts label values past 2 048 bytes at a character boundary, global tags included" do
    long = "é" * 1500 # 3 000 bytes
    native._enqueue(window([[frames("A#b"), { "v" => long }, 1_000, 1]]), [100, Dir.pwd, [], { "tag" => long }],
                    "#{receiver.url}/ingest?name=spec.app&from=#{Time.now.to_i}&until=#{Time.now.to_i + 10}" \
                    "&format=pprof&sampleRate=100&spyName=rbspy", "#{receiver.url}/ingest")
    receiver.wait_for(1)
    expect(receiver.violations).to be_empty
    expect(receiver.samples.first[:labels]).to eq("v" => "é" * 1024, "tag" => "é" * 1024)
  end

  it "cuts stacks deeper than 1 000 frames" do
    deep = Array.new(1500) { |i| ["M#f#{i}", "/x.rb", i + 1] }
    enqueue(window([[deep, {}, 5_000, 1]]))
    receiver.wait_for(1)
    got = receiver.samples.first[:frames]
    expect(got.size).to eq(1000)
    expect(got.last.first).to eq("(truncated)")
    expect(got.first).to eq(["M#f0", "/x.rb", 1])
  end

  context "with windows of a second" do
    # the receiver decodes a part of 3 000 such stacks in seconds before it answers
    let(:options) { { upload_interval: 1, timeout: 30 } }

    # Regression: the exporter's thread (a Ruby thread: 1 MiB of machine stack) built a deep
    # window's stacks with alloca in a loop, 1 KB per 200-frame stack, never released before
    # the last: SystemStackError from 2 500 such stacks on, and the exporter stopped for good.
    it "delivers a window of 5 000 distinct 200-frame stacks from the exporter's thread" do
      native.start(sample_rate: 1) # each stack recorded by the label change at its leaf
      DeepStacks.each(0...5000) { |i| native.set_labels({ "i" => i.to_s }) }
      native.clear_labels
      exporter.start
      receiver.wait_for(1, timeout: 30) # the window its thread takes at the next second
      native.stop
      exporter.stop(timeout: 10)
      expect(receiver.violations).to be_empty
      expect(log.string).not_to include("exporting a window failed")
      deep = receiver.samples.map { |s| s[:frames] }.select { |frames| frames.size >= 200 }.uniq
      expect(deep.size).to be >= 5000
    end
  end

  # Regression: any error in the exporter's loop ended its thread, and every later window
  # stayed in the sampler. The failure injected here is a Logger whose formatter raises once
  # (as a strict one may on a server's message), on the upload event the thread logs.
  it "goes on exporting after a window fails, and logs the failure once" do
    armed = true
    failed = Queue.new
    logger = Logger.new(log)
    logger.formatter = proc do |severity, _time, _progname, message|
      if armed
        armed = false
        failed << Time.now.to_i
        raise ArgumentError, "invalid byte sequence in UTF-8"
      end
      "#{severity}: #{message}\n"
    end
    receiver.mode = [:status, 503] # an upload event, which the exporter's thread logs at its next window
    exporter = described_class.new(application_name: "spec.app", server_address: receiver.url, logger: logger,
                                   upload_interval: 1, timeout: 30)
    native.start
    burning = true
    burner = Thread.new { work.heavy(0.02) while burning }
    exporter.start
    failed_at = failed.pop
    receiver.mode = :ok
    count = 1
    count += 1 until receiver.wait_for(count, timeout: 10).any? { |r| Integer(r[:params]["from"]) > failed_at }
    burning = false
    burner.join
    exporter.stop(timeout: 5)
    expect(receiver.violations).to be_empty
    expect(log.string.scan("exporting a window failed").size).to eq(1), log.string
  end

  it "holds no exporter once stopped: one at_exit for the process, not one per exporter" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      require "logger"
      50.times do
        exporter = Pyroscope::Exporter.new(application_name: "many.app", server_address: #{receiver.url.inspect},
                                           logger: Logger.new(nil))
        exporter.start
        exporter.stop(timeout: 5)
      end
      GC.start
      puts ObjectSpace.each_object(Pyroscope::Exporter).count
    RUBY
    expect(status).to be_success, "#{status.inspect} #{err}"
    expect(Integer(out)).to be <= 2 # what the GC may still see on the stack; it was all 50
  end

  it "retries a 500 and a cut response, and delivers once the server answers" do
    receiver.mode = [:status, 500]
    enqueue(window([[frames("A#b"), {}, 1_000, 1]]))
    sleep 0.3
    receiver.mode = :cut
    sleep 1.5
    receiver.mode = :ok
    native.flush(10)
    expect(receiver.accepted.size).to eq(1), "#{native.upload_stats} #{receiver.requests.map { |r| r[:status] }}"
    expect(native.upload_stats[:retries]).to be >= 1
  end

  it "waits as long as Retry-After asks on a 429" do
    receiver.mode = [:retry_after, 2]
    enqueue(window([[frames("A#b"), {}, 1_000, 1]]))
    sleep 0.3
    receiver.mode = :ok
    first = receiver.requests.first
    expect(first[:status]).to eq(429)
    sleep 1.0
    expect(receiver.accepted).to be_empty # still waiting out the 2 s
    receiver.wait_for(1, timeout: 5)
  end

  it "never retries a 400, and counts the window as failed" do
    receiver.mode = [:status, 400]
    failed = native.upload_stats[:windows_failed]
    enqueue(window([[frames("A#b"), {}, 1_000, 1]]))
    native.flush(3)
    sleep 0.2
    expect(receiver.requests.size).to eq(1)
    expect(native.upload_stats[:windows_failed]).to eq(failed + 1)
    expect(native.upload_stats[:last_error]).to match(/400/)
  end

  it "does not block the application while the server stalls or refuses" do
    receiver.mode = [:stall, 10] # longer than the 2 s request timeout: cut by it, then retried
    enqueue(window([[frames("A#b"), {}, 1_000, 1]]))
    returned_while_stalled = receiver.requests.empty?
    expect(returned_while_stalled).to be(true)
    receiver.refuse!
    3.times { enqueue(window([[frames("C#d"), {}, 1_000, 1]])) }
    expect(receiver.requests).to be_empty # every enqueue returned before any answer
    receiver.accept!
    receiver.mode = :ok
    native.flush(15)
    expect(receiver.accepted.size).to be >= 1
  end

  it "drops the oldest windows past the queue cap and says so" do
    described_class.new(application_name: "spec.app", server_address: receiver.url, logger: Logger.new(log),
                        queue_max_windows: 2)
    receiver.refuse!
    before = native.upload_stats[:windows_dropped]
    5.times { enqueue(window([[frames("A#b"), {}, 1_000, 1]])) }
    expect(native.upload_stats[:queued_windows]).to be <= 2
    expect(native.upload_stats[:windows_dropped] - before).to be >= 3
    receiver.accept!
  end

  it "logs a failure once per kind and state change, not once per window" do
    enqueue(window([[frames("A#b"), {}, 1_000, 1]])) # the uploader's state starts at "succeeding"
    native.flush(5)
    exporter.stop(timeout: 1)
    log.truncate(0)
    receiver.mode = [:status, 503]
    4.times { enqueue(window([[frames("A#b"), {}, 1_000, 1]])) }
    sleep 0.5
    receiver.mode = :ok
    native.flush(15)
    exporter.stop(timeout: 1)
    # this receiver's lines only: an earlier example's retries, still running, log their own
    mine = log.string.lines.grep(/#{Regexp.escape(receiver.url)}/).join
    expect(mine.scan("HTTP 503").size).to eq(1), log.string
    expect(log.string.scan("succeed again").size).to eq(1)
  end

  # Regression: the state-change log was global, so a server that failed right after another
  # one had (a reconfigured exporter, the next spec) never had its failure logged.
  it "logs the first failure of each server, also when the one before it was failing" do
    receiver.mode = [:status, 503]
    enqueue(window([[frames("A#b"), {}, 1_000, 1]]))
    sleep 0.5
    exporter.stop(timeout: 1)
    # this receiver's lines only: an earlier example's retries, still running, log their own
    mine = log.string.lines.grep(/#{Regexp.escape(receiver.url)}/).join
    expect(mine.scan("HTTP 503").size).to eq(1), log.string
    other = ContractReceiver.new
    other.mode = [:status, 500]
    second_log = StringIO.new
    second = described_class.new(application_name: "spec.other", server_address: other.url,
                                 logger: Logger.new(second_log), connect_timeout: 1, timeout: 2)
    native._enqueue(window([[frames("A#b"), {}, 1_000, 1]]), [100, Dir.pwd, [], nil],
                    "#{other.url}/ingest?name=spec.other&from=#{Time.now.to_i}&until=#{Time.now.to_i + 10}" \
                    "&format=pprof&sampleRate=100&spyName=rbspy", "#{other.url}/ingest")
    sleep 0.5
    second.stop(timeout: 1)
    expect(second_log.string.lines.grep(/#{Regexp.escape(other.url)}/).join.scan("HTTP 500").size).to eq(1), second_log.string
  ensure
    other&.close
  end

  it "sends the last window when the process exits" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      require "logger"
      Pyroscope::Native.start
      exporter = Pyroscope::Exporter.new(application_name: "exit.app", server_address: #{receiver.url.inspect},
                                         logger: Logger.new($stderr))
      exporter.start
      x = 0
      stop_at = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + 0.1
      x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < stop_at
      puts "exiting"
    RUBY
    expect(status).to be_success, "#{status.inspect} #{err}"
    expect(out).to eq("exiting\n")
    got = receiver.wait_for(1)
    expect(got.first[:params]["name"]).to eq("exit.app")
    expect(got.first[:samples].sum { |s| s[:cpu_ns] }).to be > 50_000_000
  end

  it "never samples its own thread" do
    native.start
    exporter.start
    work.heavy(0.2)
    exporter.stop(timeout: 5)
    native.stop
    receiver.wait_for(1)
    # the caller's own stop may be sampled; the exporter's thread (Exporter#run) never is
    names = receiver.samples.flat_map { |s| s[:frames] }.map(&:first)
    expect(names).to include("Workload#heavy")
    expect(names.grep(/Exporter#run/)).to be_empty
  end

  it "rejects a bad application name or server address, naming the value" do
    expect { described_class.new(application_name: "my app{x}", server_address: receiver.url, logger: Logger.new(log)) }
      .to raise_error(ArgumentError, /application_name must match .* got "my app\{x\}"/)
    expect { described_class.new(application_name: "ok", server_address: "ftp://x", logger: Logger.new(log)) }
      .to raise_error(ArgumentError, %r{server_address must be an http:// or https:// URL or file:///dir, got "ftp://x"})
    expect { described_class.new(application_name: "ok", server_address: receiver.url, logger: Logger.new(log), http_headers: { "X" => "a\r\nB: c" }) }
      .to raise_error(ArgumentError, /http_headers/)
  end
end
