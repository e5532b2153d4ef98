# frozen_string_literal: true

# The native side's memory stays bounded however long the process runs and whatever the
# application does wrong: spans it never finishes, threads it labels as they end, own
# paths it registers again and again.
RSpec.describe "Bounded native memory" do
  let(:native) { Pyroscope::Native }

  it "keeps at most 128 active spans per fiber, dropping the outermost and counting it" do
    result = Thread.new do
      dropped = native.stats[:spans_dropped].to_i
      outermost = native.push_span("span_id", "0")
      10_000.times { |i| native.push_span("span_id", (i + 1).to_s) } # never popped
      GC.start
      live = ObjectSpace.each_object(Pyroscope::Native::SpanLabels).count
      carried = native.labels
      native.pop_span(outermost) # dropped already: a no-op
      { live: live, carried: carried, after_pop: native.labels, dropped: native.stats[:spans_dropped].to_i - dropped }
    end.value
    # before: 10 001 SpanLabels held by the fiber, and more with every span never finished
    expect(result[:live]).to be <= 128 + 8 # a few unreferenced ones the conservative GC keeps
    expect(result[:carried]).to eq("span_id" => "10000")
    expect(result[:after_pop]).to eq("span_id" => "10000")
    expect(result[:dropped]).to eq(10_001 - 128)
  end

  it "leaves no label set behind when threads are labelled from another thread as they end" do
    GC.start # sets of earlier examples' ended fibers go with their objects
    native.start
    baseline = native.stats.values_at(:label_sets, :threads)
    calls = 0
    200.times do
      go = Queue.new
      target = Thread.new { go.pop && 2_000.times.sum }
      Thread.pass until target.stop? # running: its native thread id is known (3.3 sets it as it starts)
      calls += 1 if native.set_thread_labels(target, { "wide" => calls.to_s })
      go << true
      calls += 1 while native.set_thread_labels(target, { "wide" => calls.to_s })
      target.join
    end
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 2 # exit hooks run after join (>= 3.2)
    sleep 0.01 while native.stats[:threads] > baseline[1] && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
    native.stop
    native.take_window # its samples hold references to the sets they were charged to
    # each thread's sets went with its entry; a set put on an entry its exit hook had just
    # released (3.2+, without the GVL) was never freed
    expect(native.stats.values_at(:label_sets, :threads)).to eq(baseline)
    expect(calls).to be >= 200
  end

  it "frees the own-path prefixes it replaces, their lengths included" do
    # under bin/sanitize-spec, ASan would hold freed memory in quarantine: reused at once here
    asan = ENV["ASAN_OPTIONS"] && { "ASAN_OPTIONS" => "#{ENV["ASAN_OPTIONS"]}:quarantine_size_mb=0" }
    out, err, status = run_ruby(<<~'RUBY', env: asan || {})
      require "pyroscope"
      native = Pyroscope::Native
      paths = Array.new(20_000) { |i| "/no/such/prefix/#{i}" }
      rss = -> { File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i * 1024 }
      native.own_paths = paths
      before = rss.call
      200.times { native.own_paths = paths }
      p rss.call - before
    RUBY
    expect(status).to be_success, err
    # before: +32 MB (8 bytes of length per prefix per call never freed)
    expect(Integer(out.lines.last)).to be < 8 * 1024 * 1024
  end
end
