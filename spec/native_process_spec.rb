# frozen_string_literal: true

# Behaviour that needs a process of its own: signal ownership, M:N threads, fork.
RSpec.describe "Pyroscope::Native in its process" do
  it "refuses to start, clearly, when another profiler owns SIGPROF" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      trap("PROF") { }
      begin
        Pyroscope::Native.start
      rescue RuntimeError => e
        puts e.message
      end
      puts Pyroscope::Native.running?
    RUBY
    expect(status).to be_success, err
    expect(out).to include("another profiler", "SIGPROF")
    expect(out.lines.last.strip).to eq("false")
  end

  it "refuses next to a running stackprof and leaves stackprof working" do
    out, err, status = run_ruby(<<~RUBY)
      require "stackprof"
      require "pyroscope"
      StackProf.start(mode: :cpu, interval: 1000)
      begin
        Pyroscope::Native.start
      rescue RuntimeError => e
        puts e.message
      end
      t = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) + 0.3
      x = 0
      x += 1 while Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID) < t
      StackProf.stop
      puts StackProf.results[:samples]
    RUBY
    expect(status).to be_success, err
    message, samples = out.lines.map(&:strip)
    expect(message).to include("another profiler")
    expect(samples.to_i).to be > 30 # stackprof's own samples kept coming (~75 alone here: a 4 ms tick)
  end

  it "never lets a pending SIGPROF kill the process after stop" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      Pyroscope::Native.start(sample_rate: 1000)
      x = 0
      200_000.times { x += 1 }
      Pyroscope::Native.stop
      5.times { Process.kill(:PROF, Process.pid) }
      sleep 0.05
      puts "alive"
    RUBY
    expect(status).to be_success, err
    expect(out).to eq("alive\n")
  end

  # Ruby >= 3.3 turns M:N threads on for any RUBY_MN_THREADS above 0 (atoi, thread_pthread.c);
  # 3.1 has no M:N threads, the variable means nothing there.
  { "1" => true, "2" => true, "0" => false, "no" => false }.each do |value, mn|
    it "#{mn ? "refuses" : "starts"} to sample with RUBY_MN_THREADS=#{value}#{mn ? ", with a warning, where Ruby has M:N threads" : ""}" do
      out, err, status = run_ruby(<<~RUBY, env: { "RUBY_MN_THREADS" => value })
        require "pyroscope"
        p Pyroscope::Native.start
        Pyroscope::Native.set_labels({ "still" => "works" })
        p Pyroscope::Native.labels
      RUBY
      expect(status).to be_success, err
      refused = mn && Gem::Version.new(RUBY_VERSION) >= Gem::Version.new("3.3")
      # before: "2" was sampled on 3.3 and 3.4, one native thread's CPU clock standing for many threads
      expect(out.lines.first.strip).to eq(refused ? "false" : "true")
      expect(err).to(refused ? include("M:N threads") : be_empty)
      expect(out.lines.last).to include('"still"=>"works"').or include('"still" => "works"')
    end
  end

  it "never samples the threads of other Ractors, M:N on Ruby >= 3.3 whatever RUBY_MN_THREADS says" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      Warning[:experimental] = false
      def ractor_work(seconds)
        stop_at = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + seconds
        x = 0
        x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < stop_at
        x
      end
      native = Pyroscope::Native
      native.start(sample_rate: 1000)
      baseline = native.stats[:threads]
      Ractor.new do
        Ractor.main.send(:running)
        ractor_work(0.2)
        Ractor.main.send(:done)
      end
      Ractor.receive
      entries = native.stats[:threads] - baseline
      Ractor.receive
      native.stop
      ractor = native.take_window[:samples].select { |frames, *| frames.any? { |name, *| name.include?("ractor_work") } }
      p(entries: entries, ractor_cpu_ns: ractor.sum { |s| s[2] })
    RUBY
    expect(status).to be_success, err
    # before (3.3, 3.4): an entry and a timer for the Ractor's thread, and its 200 ms sampled
    # on a native thread M:N threads share
    expect(eval(out.lines.last)).to eq(entries: 0, ractor_cpu_ns: 0) # rubocop:disable Security/Eval
  end

  it "leaves a forked child stopped, with the forking thread's labels and an empty window" do
    native = Pyroscope::Native
    native.start
    native.set_labels({ "span" => "parent" })
    Workload.new.heavy(0.05)
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      state = { running: native.running?, labels: native.labels, samples: native.take_window[:samples].size }
      native.start
      Workload.new.heavy(0.05)
      native.stop
      state[:child_samples] = native.take_window[:samples].count { |_, l, *| l["span"] == "parent" }
      writer.write(Marshal.dump(state))
      writer.close
      exit!(0)
    end
    writer.close
    child = Marshal.load(reader.read)
    Process.wait(pid)
    expect($?).to be_success
    expect(child).to include(running: false, labels: { "span" => "parent" }, samples: 0)
    expect(child[:child_samples]).to be > 0
    expect(native).to be_running
    Workload.new.heavy(0.05)
    native.stop
    expect(cpu_by(take_samples) { |_, l| l["span"] }["parent"]).to be > 50_000_000
  ensure
    reader&.close
  end
end
