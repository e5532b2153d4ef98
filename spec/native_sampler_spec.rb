# frozen_string_literal: true

RSpec.describe "Pyroscope::Native sampler" do
  let(:native) { Pyroscope::Native }
  let(:work) { Workload.new }

  it "splits CPU between two methods in proportion to the CPU they burned" do
    # Segments of a few sample intervals: finer interleaving at 100 Hz measures the
    # sampling statistics (about +-4 points per CPU second) rather than the profiler.
    native.start(sample_rate: 100)
    5.times do
      work.heavy(0.15)
      work.light(0.05)
    end
    native.stop
    cpu = cpu_by(take_samples) do |frames, _|
      if on_stack?(frames, "heavy") then :heavy
      elsif on_stack?(frames, "light") then :light
      end
    end
    share = cpu[:heavy].to_f / (cpu[:heavy] + cpu[:light])
    expect(share).to be_within(0.05).of(0.75)
    # weights are CPU time, not sample counts: together they account for the 0.8 s burned
    expect((cpu[:heavy] + cpu[:light]) / 1e9).to be_within(0.1).of(1.0)
  end

  it "charges each thread's CPU to that thread's labels only" do
    native.start
    threads = [%w[one worker_one], %w[two worker_two]].map do |label, meth|
      Thread.new do
        native.set_labels({ "thread" => label })
        15.times do
          work.public_send(meth, 0.01)
          Thread.pass
        end
        native.clear_labels
      end
    end
    threads.each(&:join)
    native.stop
    samples = take_samples
    one = samples.select { |_, labels, _, _| labels["thread"] == "one" }
    two = samples.select { |_, labels, _, _| labels["thread"] == "two" }
    expect(one.sum { |s| s[2] }).to be > 100_000_000
    expect(two.sum { |s| s[2] }).to be > 100_000_000
    expect(one.count { |frames, *| on_stack?(frames, "worker_two") }).to eq(0)
    expect(two.count { |frames, *| on_stack?(frames, "worker_one") }).to eq(0)
    expect(one.count { |frames, *| on_stack?(frames, "worker_one") }).to be > 0
  end

  it "gives no CPU to sleeping or blocked threads" do
    queue = Queue.new
    reader, writer = IO.pipe
    native.start
    sleepers = [
      Thread.new { native.set_labels({ "role" => "sleep" }); sleep 0.4 },
      Thread.new { native.set_labels({ "role" => "queue" }); queue.pop },
      Thread.new { native.set_labels({ "role" => "pipe" }); reader.read(1) },
    ]
    work.heavy(0.4)
    queue << :go
    writer.write("x")
    sleepers.each(&:join)
    native.stop
    cpu = cpu_by(take_samples) { |_, labels| labels["role"] || "busy" }
    expect(cpu["busy"]).to be > 300_000_000
    %w[sleep queue pipe].each do |role|
      # at most the few microseconds each thread spends between its label and blocking
      expect(cpu[role]).to be < 5_000_000, "#{role} got #{cpu[role]} ns"
    end
  ensure
    reader&.close
    writer&.close
  end

  it "gives spans shorter than the sample interval their CPU" do
    native.start(sample_rate: 100)
    measured = {}
    200.times do |i|
      native.set_labels({ "span" => i.to_s })
      before = thread_cpu
      work.heavy(0.002)
      measured[i.to_s] = thread_cpu - before
      native.clear_labels
    end
    native.stop
    cpu = cpu_by(take_samples) { |_, labels| labels["span"] }
    attributed = measured.keys.sum { |span| cpu[span] } / 1e9
    expect(attributed).to be_within(0.10 * measured.values.sum).of(measured.values.sum)
    expect(measured.keys.count { |span| cpu[span].positive? }).to be >= 190
  end

  it "charges the tail of a sampled span to the span's own sampled stacks, not to where it ends" do
    native.start(sample_rate: 100)
    20.times do |i|
      native.set_labels({ "span" => i.to_s })
      work.heavy(0.03)
      native.clear_labels
    end
    native.stop
    labelled = take_samples.reject { |_, labels, *| labels.empty? }
    in_heavy = cpu_by(labelled) { |frames, _| on_stack?(frames, "heavy") }
    expect(in_heavy[true].to_f / (in_heavy[true] + in_heavy[false])).to be > 0.97
  end

  # Spans of a kind that has no timer sample yet (this one, right after start): the stack
  # where the labels changed is the only one there is; see spec/attribution_spec.rb for
  # spans of a sampled kind.
  it "charges a span of a kind with no timer sample at the stack where its labels changed" do
    native.start(sample_rate: 10)
    native.set_labels({ "span" => "short" })
    work.light(0.002)
    native.clear_labels
    native.stop
    short = take_samples.select { |_, labels, *| labels["span"] == "short" }
    expect(short.size).to eq(1)
    frames, _, cpu_ns, count = short.first
    expect(cpu_ns).to be >= 2_000_000
    expect(count).to eq(0) # a boundary charge, not a timer sample
    # the binding's own frames (set_labels, clear_labels) are skipped: the leaf is the caller
    expect(frame_names(frames).first).to match(/block \(\d levels\) in <top \(required\)>/)
    expect(frames.first[1]).to end_with("native_sampler_spec.rb")
  end

  it "can be started and stopped repeatedly, and samples only while started" do
    expect(native.stop).to be(false)
    5.times do
      expect(native.start).to be(true)
      expect(native.start).to be(false)
      expect(native).to be_running
      # 100 ms: the CPU after a thread's last sample is not charged at stop (up to 1.5
      # intervals, more when the machine is loaded and timers fire late)
      work.heavy(0.1)
      expect(native.stop).to be(true)
      expect(native.stop).to be(false)
      expect(on_any_stack(take_samples, "heavy")).to be > 60_000_000
    end
    work.light(0.05)
    expect(take_samples).to be_empty
    expect(native.stats[:signal_handler_installed]).to be(true)
  end

  it "ignores a SIGPROF that is not from its timers, also when stopped" do
    native.start
    native.stop
    Process.kill(:PROF, Process.pid)
    sleep 0.05
    expect(native).not_to be_running
  end

  it "keeps sampled frames valid through GC.compact and auto-compaction" do
    klass = Class.new
    Object.const_set(:CompactionVictim, klass)
    50.times do |i|
      klass.class_eval(<<~RUBY, "victim.rb", 1)
        def m#{i}(seconds)
          x = 0
          stop_at = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + seconds
          x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < stop_at
          x
        end
      RUBY
    end
    GC.auto_compact = true
    native.start(sample_rate: 1000)
    obj = klass.new
    50.times do |i|
      obj.public_send("m#{i}", 0.01)
      Array.new(2000) { "garbage #{i}" }
      GC.compact if (i % 10).zero?
    end
    native.stop
    # the methods die; only the window still refers to their code
    50.times { |i| klass.send(:remove_method, "m#{i}") }
    Object.send(:remove_const, :CompactionVictim)
    obj = nil # rubocop:disable Lint/UselessAssignment
    3.times do
      GC.start
      GC.compact
    end
    names = take_samples.flat_map { |frames, *| frame_names(frames) }.uniq
    victims = names.grep(/#m\d+\z/)
    expect(victims.size).to be >= 40
    expect(victims).to all(match(/\ACompactionVictim#m\d+\z|#<Class:0x\h+>#m\d+\z/))
  ensure
    GC.auto_compact = false
  end

  it "samples threads that start and exit while profiling, and forgets them after" do
    baseline = native.stats[:threads]
    # other specs' threads (killed receivers) may still be on their way out: not more than before
    label_sets = native.stats[:label_sets]
    native.start
    measured = Queue.new
    5.times do |wave|
      Array.new(20) do |i|
        Thread.new do
          native.set_labels({ "worker" => "#{wave}-#{i}" })
          before = thread_cpu
          work.worker_one(0.01)
          measured << (thread_cpu - before)
          native.clear_labels
        end
      end.each(&:join)
    end
    native.stop
    cpu = cpu_by(take_samples) { |_, labels| labels["worker"] }
    cpu.delete(nil)
    expect(cpu.size).to eq(100)
    total = Array.new(measured.size) { measured.pop }.sum
    expect(cpu.values.sum / 1e9).to be_within(0.1 * total).of(total)
    expect(native.stats[:threads]).to be <= baseline + 1
    expect(native.stats[:label_sets]).to be <= label_sets
  end

  # Regression: an exiting thread's entry was released without charging the CPU it used since
  # its last sample, so threads that end inside their labels lost their last moments.
  it "charges a thread's CPU since its last sample when it exits, labels still set" do
    native.start(sample_rate: 10) # timer samples are rare: most of the CPU is charged at exit
    total = burn_in_threads(40, :worker_two, 0.003) { |i| native.set_labels({ "exiting" => i.to_s }) }
    native.stop
    cpu = cpu_by(take_samples) { |_, labels| labels["exiting"] }
    cpu.delete(nil)
    expect(cpu.size).to eq(40)
    expect(cpu.values.sum / 1e9).to be_within(0.1 * total).of(total)
  end

  it "keeps labels consistent when many threads set and clear them at once" do
    label_sets = native.stats[:label_sets]
    native.start(sample_rate: 1000)
    methods = 8.times.map do |i|
      name = "labelled_#{i}"
      Workload.define_method(name) { |s| burn(s) }
      name
    end
    threads = methods.each_with_index.map do |meth, i|
      Thread.new do
        200.times do |k|
          native.set_labels({ "thread" => i.to_s, "n" => k.to_s })
          work.public_send(meth, 0.0005)
          native.clear_labels
        end
      end
    end
    threads.each(&:join)
    native.stop
    samples = take_samples
    labelled = samples.reject { |_, labels, *| labels.empty? }
    expect(labelled.size).to be > 100
    labelled.each do |frames, labels, *|
      others = methods - ["labelled_#{labels["thread"]}"]
      expect(others.none? { |m| on_stack?(frames, m) }).to be(true), "thread #{labels["thread"]} sample on #{frame_names(frames).first(3)}"
    end
    expect(native.stats[:label_sets]).to be <= label_sets
  end

  it "charges a GC's CPU to the code that allocated, under a (garbage collection) leaf" do
    # The sample deferred during a GC is taken after it: by the GC's exit hook on Ruby >= 3.3,
    # by a postponed job on 3.1/3.2 (where a GC hook would slow every allocation).
    # A heap grown by an earlier example (the 5 000-stack window: 1.1 M slots) makes minor GCs
    # rare (3 instead of ~1 400 per 0.5 s on 3.1): compaction gives its empty pages back, and
    # the allocation goes on past 1.5 s of CPU until more than 50 GCs ran (38 on a 3.4 lane
    # after compaction, in 1.5 s).
    GC.start
    GC.compact
    native.start(sample_rate: 250)
    gc_before = GC.count
    before = thread_cpu
    work.allocate_garbage(0.25) while thread_cpu - before < 1.5 || (GC.count - gc_before <= 50 && thread_cpu - before < 10)
    spent = thread_cpu - before
    native.stop
    expect(GC.count - gc_before).to be > 50
    samples = take_samples
    gc = samples.select { |frames, *| frames.first.first == "(garbage collection)" }
    gc_cpu = gc.sum { |s| s[2] }
    expect(gc_cpu).to be > 0
    expect(gc.count { |frames, *| frames.size == 1 }).to eq(0)
    under_allocator = gc.select { |frames, *| on_stack?(frames, "allocate_garbage") }.sum { |s| s[2] }
    expect(under_allocator.to_f / gc_cpu).to be >= 0.9
    expect(samples.sum { |s| s[2] } / 1e9).to be_within(0.1 * spent).of(spent)
  end

  it "truncates stacks deeper than max_depth with a visible marker" do
    native.start(max_depth: 64)
    work.recurse(200, 0.1)
    native.stop
    deep = take_samples.map(&:first).select { |frames| on_stack?(frames, "burn") }
    expect(deep).not_to be_empty
    deep.each do |frames|
      expect(frames.size).to eq(65)
      expect(frames.last).to eq(["(truncated)", "", 0])
      expect(frames.first(64).map(&:first)).not_to include("(truncated)")
    end
  end

  it "returns frames with name, file and line" do
    native.start
    work.heavy(0.1)
    native.stop
    frames = take_samples.map(&:first).find { |f| on_stack?(f, "heavy") }
    heavy = frames.find { |name, *| name.end_with?("#heavy") }
    expect(heavy[0]).to eq("Workload#heavy")
    expect(heavy[1]).to end_with("spec/support/workload.rb")
    expect(heavy[2]).to eq(7)
  end

  it "rejects bad options with an error naming them" do
    expect { native.start(sample_rate: 0) }.to raise_error(ArgumentError, /sample_rate must be 1..1000 Hz, got 0/)
    expect { native.start(sample_rate: 1001) }.to raise_error(ArgumentError, /sample_rate/)
    expect { native.start(sample_rate: "100") }.to raise_error(ArgumentError, /sample_rate must be an Integer, got "100"/)
    expect { native.start(max_depth: 0) }.to raise_error(ArgumentError, /max_depth/)
    expect { native.start(max_samples: 1) }.to raise_error(ArgumentError, /max_samples/)
    expect(native).not_to be_running
  end

  it "counts what it drops past max_samples instead of growing" do
    window = overflowed_window
    dropped, kept = window[:samples].partition { |frames, *| frame_names(frames) == ["(dropped)"] }
    expect(kept.size).to be <= 16
    expect(window[:dropped_samples]).to be > 0
    expect(window[:dropped_cpu_ns]).to be > 0
    # what was dropped stays in the window's total, on a frame of its own, without labels
    expect(dropped).to eq([[[["(dropped)", "", 0]], {}, window[:dropped_cpu_ns], window[:dropped_samples], 0]]) # no wall: 0
  end

  # Regression: a Rails-like window overflowed the frame storage at default settings (flat,
  # max_samples x 8 frames: 524 288 of the 1 000 000 here) and dropped samples.
  it "keeps a window of 5 000 distinct 200-frame stacks sharing their root side, at default settings" do
    # max_samples and max_depth at their defaults. Each stack is recorded by the label change
    # at its leaf (the CPU since the last one goes there); at 1 Hz no timer sample comes
    # between a stack and its label change.
    native.start(sample_rate: 1)
    DeepStacks.each(0...5000) { |i| native.set_labels({ "i" => i.to_s }) }
    native.clear_labels
    native.stop
    expect(native.stats[:window_dropped_samples]).to eq(0)
    window = native.take_window
    expect(window[:dropped_samples]).to eq(0)
    stacks = window[:samples].map(&:first).select { |frames| frames.size >= 200 }.uniq
    expect(stacks.size).to be >= 5000
  end

  # Regression: threads kept (buffer, generation, index) references to their last sample; a
  # restart with another max_samples or max_depth reallocated the buffers at generation 0, so a
  # stale reference matched and the next label change added its CPU to whichever sample now
  # had that index (another thread's labels), or wrote past a smaller buffer.
  [{ max_samples: 16 }, { max_depth: 33 }].each do |changed|
    it "never charges CPU through a sample of the buffers before a restart with #{changed.keys.first}" do
      native.start(sample_rate: 100, max_samples: 48, max_depth: 64)
      native.set_labels({ "who" => "main" })
      samples = native.stats[:samples]
      work.heavy(0.005) while native.stats[:samples] == samples # main now holds a sample reference
      native.stop
      native.start(sample_rate: 1, max_samples: 48, max_depth: 64, **changed)
      before = thread_cpu # main's labels get its CPU from the start: the thread below's creation too
      # fill the new buffer's first samples with another thread's labels (label changes only:
      # at 1 Hz its timer does not fire in so little CPU)
      Thread.new { 8.times { |i| native.set_labels({ "who" => "other#{i}" }) } }.join
      work.heavy(0.2) # at 1 Hz the first expiry is >= 0.5 s of CPU away: no timer sample
      native.set_labels({ "who" => "after" })
      spent = thread_cpu - before
      native.stop
      cpu = cpu_by(take_samples) { |_, labels| labels["who"] }
      others = cpu.sum { |who, ns| who.to_s.start_with?("other") ? ns : 0 }
      expect(others).to be < 20_000_000, "another thread's labels got #{others / 1e6} ms"
      expect(cpu["main"] / 1e9).to be_within(0.1 * spent).of(spent)
    end
  end

  def on_any_stack(samples, method_name)
    cpu_by(samples) { |frames, _| on_stack?(frames, method_name) }[true]
  end
end
