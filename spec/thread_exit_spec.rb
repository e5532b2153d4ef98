# frozen_string_literal: true

require "timeout"

# A thread's table entry (its labels, CPU timer and CPU accounting) lives as long as the
# thread, however the thread ends. Ruby 3.1 reports only threads that return (:thread_end),
# and its thread cache runs the next Ruby thread on an ended one's native thread, same tid.
RSpec.describe "Thread entries of ended threads" do
  let(:native) { Pyroscope::Native }
  let(:work) { Workload.new }

  # The timeout gem >= 0.3 (Ruby >= 3.2) starts one thread for good at its first use: started
  # (and running) before any baseline, it is no leak.
  before(:context) do
    Timeout.timeout(1) {}
    sleep 0.1
  end

  # How each thread ends, after it labelled itself.
  endings = {
    "returns" => -> {},
    "raises" => -> { raise "boom" },
    "is killed" => -> { sleep }, # killed by the test
    "is timed out" => -> { Timeout.timeout(0.01) { sleep } },
    "kills Timeout's watchers" => -> { 3.times { Timeout.timeout(5) { sleep 0.001 } } },
  }

  # n threads alive at once (so on distinct native threads), each tagged for itself (the
  # pyroscope-otel 0.1 call), inside a tag_wrapper, and thread-wide from this thread (the
  # 0.5 SDK's _add_tags(thread_id, ...)); then each ends as told. Returns when all ended.
  def end_labelled_threads(n, ending, kill: false)
    ready = Queue.new
    go = Queue.new
    threads = Array.new(n) do |i|
      Thread.new do
        Thread.current.report_on_exception = false
        Pyroscope._add_tags(Pyroscope.thread_id, { "victim" => "t#{i}" })
        Pyroscope.tag_wrapper({ "request" => "r#{i}" }) do
          ready << Thread.current
          go.pop
          ending.call
        end
      end
    end
    n.times { Pyroscope._add_tags(ready.pop.native_thread_id, { "victim_wide" => "yes" }) }
    n.times { go << true }
    threads.each(&:kill) if kill
    threads.each do |t|
      t.join
    rescue StandardError
      nil
    end
  end

  # stats[:threads] once it is at most `limit`, or after `timeout`: on Ruby >= 3.2 a
  # thread's exit hook runs just after join returns.
  def threads_settled(limit, timeout: 2)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      n = native.stats[:threads]
      return n if n <= limit || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.01
    end
  end

  [false, true].each do |running|
    endings.each do |how, ending|
      it "frees the entry of a thread that #{how} (sampler #{running ? "running" : "stopped"})" do
        native.start if running
        baseline = native.stats[:threads]
        end_labelled_threads(20, ending, kill: how == "is killed")
        # before: 20 killed threads left 20 entries on Ruby 3.1
        expect(threads_settled(baseline)).to be <= baseline
      end
    end
  end

  it "frees entries labelled by native thread id (set_thread_labels), which bind no thread" do
    baseline = native.stats[:threads]
    ready = Queue.new
    threads = Array.new(20) { Thread.new { ready << Thread.current.native_thread_id; sleep } }
    tids = Array.new(20) { ready.pop }
    expect(tids.map { |tid| native.set_thread_labels(tid, { "by_id" => "yes" }) }).to all(be(true))
    threads.each(&:kill).each(&:join)
    # before: 20 entries stayed on every Ruby (none was bound to its thread, so no exit freed it)
    expect(threads_settled(baseline)).to be <= baseline
    # a tid no Ruby thread runs on is never sampled: nothing to label
    expect(native.set_thread_labels(2**31 - 2, { "by_id" => "yes" })).to be(false)
    expect(native.stats[:threads]).to be <= baseline
  end

  it "never lets a new thread inherit an ended thread's labels or CPU, even on its native thread" do
    native.start
    end_labelled_threads(20, -> { sleep }, kill: true)
    native.take_window
    seen = Queue.new
    total = burn_in_threads(6, :worker_one, 0.1) { seen << native.labels }
    native.stop
    samples = take_samples
    expect(Array.new(6) { seen.pop }).to all(eq({}))
    burnt = samples.select { |frames, *| on_stack?(frames, "worker_one") }
    # before (Ruby 3.1): all of the new threads' CPU (600 of 600 ms) under a killed thread's tags
    inherited = burnt.select { |_, labels, *| labels.key?("victim") || labels.key?("victim_wide") || labels.key?("request") }
    expect(inherited.sum { |s| s[2] }).to eq(0)
    expect(burnt.sum { |s| s[2] } / 1e9).to be_within(0.1 * total).of(total)
  end

  it "keeps labelling calls from raising when the thread table is full, and recovers once threads end" do
    out, err, status = run_ruby(<<~'RUBY')
      require "pyroscope"
      native = Pyroscope::Native
      n = native::MAX_THREADS + 16
      baseline = native.stats[:threads]
      ready = Queue.new
      go = Queue.new
      threads = Array.new(n) do |i|
        Thread.new do
          Pyroscope.tag_wrapper({ "request" => i.to_s }) do
            Pyroscope._add_tags(Pyroscope.thread_id, { "victim" => i.to_s })
            native.push_span("span", i.to_s)
            ready << native.labels
            go.pop
          end
          :returned
        end
      end
      labelled = Array.new(n) { ready.pop }.count { |l| l["request"] }
      refused = native.stats[:threads_refused]
      n.times { go << 1 }
      ended = threads.map(&:value).tally
      # killed, not returned: on Ruby 3.1 nothing reports their end
      ready = Queue.new
      threads = Array.new(n) { Thread.new { native.set_labels({ "second" => "1" }); ready << 1; sleep } }
      n.times { ready.pop }
      threads.each(&:kill).each(&:join)
      native.start
      after = Array.new(4) { Thread.new { Pyroscope.tag_wrapper({ "after" => "1" }) { native.labels } } }.map(&:value)
      native.stop
      p(labelled: labelled, refused: refused.positive?, ended: ended, after: after.uniq,
        back: native.stats[:threads] <= baseline + 1)
    RUBY
    # before: RuntimeError "more than 4096 threads carry labels" out of tag_wrapper, in the app
    expect(status).to be_success, err
    result = eval(out.lines.last) # rubocop:disable Security/Eval
    max = Pyroscope::Native::MAX_THREADS
    expect(result).to include(refused: true, ended: { returned: max + 16 }, after: [{ "after" => "1" }], back: true)
    expect(result[:labelled]).to be_between(max - 2, max)
    expect(err.scan("threads are known to the profiler").size).to eq(1), err
  end
end
