# frozen_string_literal: true

require "logger"
require "stringio"

RSpec.describe Pyroscope do
  let(:receiver) { ContractReceiver.new }
  let(:log) { StringIO.new }
  let(:work) { Workload.new }

  after do
    described_class.shutdown
    receiver.close
    # tags outlive shutdown, as in the pyroscope gem
    Pyroscope::Native.set_labels(nil)
    Pyroscope::Native.set_thread_labels(Thread.current, nil)
  end

  def configure(**members) = configure_pyroscope("api.app", receiver.url, logger: Logger.new(log), **members)

  describe ".configure" do
    it "accepts every member of both generations of the pyroscope gem and starts profiling" do
      config = configure(app_name: nil, auth_token: "", basic_auth_username: "", basic_auth_password: "",
                         tenant_id: "", sample_rate: 100, detect_subprocesses: true, oncpu: true, report_pid: false,
                         report_thread_id: false, log_level: "debug", tags: { "region" => "eu" }, compression: "gzip",
                         report_encoding: "pprof", autoinstrument_rails: false, http_headers: {})
      expect(described_class.current_config).to be(config)
      expect(Pyroscope::Native).to be_running
      expect(log.string).to include("detect_subprocesses = true has no meaning in-process")
    end

    it "takes app_name over application_name, as the pyroscope gem did" do
      configure(app_name: "old.name")
      work.heavy(0.05)
      described_class.shutdown
      expect(receiver.wait_for(1).first[:params]["name"]).to eq("old.name")
    end

    it "rejects bad settings with an error naming the option and value, and starts nothing" do
      before = described_class.current_config
      {
        { application_name: "bad name{" } => /application_name must be set and match .*got "bad name\{"/,
        { server_address: "ftp://x" } => %r{server_address must be an http:// or https:// URL or file:///dir, got "ftp://x"},
        { sample_rate: 0 } => /sample_rate must be an Integer in 1..1000 \(Hz\), got 0/,
        { sample_rate: "100" } => /sample_rate .* got "100"/,
        { log_level: "loud" } => /log_level must be one of trace, debug, info, warn, error, got "loud"/,
        { tags: { "k" => Object.new } } => /tags: value of "k" must be/,
        { tags: [1] } => /tags must be a Hash, got \[1\]/,
        { report_pid: "yes" } => /report_pid must be true or false, got "yes"/,
      }.each do |members, message|
        expect { configure(**members) }.to raise_error(ArgumentError, message)
        expect(Pyroscope::Native).not_to be_running
        expect(described_class.current_config).to be(before)
      end
    end

    it "restarts with new settings without losing the current window" do
      configure
      described_class.tag_wrapper({ "phase" => "first" }) { work.heavy(0.1) }
      configure(application_name: "api.second", tags: { "v" => "2" })
      described_class.tag_wrapper({ "phase" => "second" }) { work.heavy(0.1) }
      described_class.shutdown
      receiver.wait_for(2)
      by_app = receiver.accepted.group_by { |r| r[:params]["name"] }
      first = by_app.fetch("api.app").flat_map { |r| r[:samples] }
      second = by_app.fetch("api.second").flat_map { |r| r[:samples] }
      expect(first.map { |s| s[:labels]["phase"] }.compact.uniq).to eq(["first"])
      expect(second.map { |s| s[:labels]["phase"] }.compact.uniq).to eq(["second"])
      expect(second.map { |s| s[:labels]["v"] }.uniq).to eq(["2"])
    end
  end

  describe "environment variables" do
    def env_config(env, &block)
      config = Pyroscope::Config.new
      block&.call(config)
      config.apply_env(env)
    end

    it "override the configure block, and PYROSCOPE_ADHOC_SERVER_ADDRESS overrides everything" do
      config = env_config({ "PYROSCOPE_SERVER_ADDRESS" => "http://env:4040", "PYROSCOPE_APPLICATION_NAME" => "env.app",
                            "PYROSCOPE_SAMPLE_RATE" => "250", "PYROSCOPE_LOG_LEVEL" => "warn",
                            "PYROSCOPE_AUTH_TOKEN" => "tok", "PYROSCOPE_TENANT_ID" => "t1",
                            "PYROSCOPE_BASIC_AUTH_USER" => "u", "PYROSCOPE_BASIC_AUTH_PASSWORD" => "p" }) do |c|
        c.server_address = "http://block:4040"
        c.application_name = "block.app"
      end
      expect(config.to_h).to include(server_address: "http://env:4040", application_name: "env.app", sample_rate: 250,
                                     log_level: "warn", auth_token: "tok", tenant_id: "t1",
                                     basic_auth_username: "u", basic_auth_password: "p")
      adhoc = env_config({ "PYROSCOPE_SERVER_ADDRESS" => "http://env:4040", "PYROSCOPE_ADHOC_SERVER_ADDRESS" => "http://adhoc:1" })
      expect(adhoc.server_address).to eq("http://adhoc:1")
    end

    it "name themselves when malformed" do
      expect { env_config({ "PYROSCOPE_SAMPLE_RATE" => "fast" }) }
        .to raise_error(ArgumentError, /PYROSCOPE_SAMPLE_RATE must be an integer, got "fast"/)
    end

    it "are read by configure" do
      out, err, status = run_ruby(<<~RUBY, env: { "PYROSCOPE_APPLICATION_NAME" => "from.env", "PYROSCOPE_SERVER_ADDRESS" => receiver.url })
        require "pyroscope"
        Pyroscope.configure { |c| c.application_name = "from.block" }
        x = 0
        t = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + 0.05
        x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < t
        puts Pyroscope.current_config.application_name
      RUBY
      expect(status).to be_success, err
      expect(out).to eq("from.env\n")
      expect(receiver.wait_for(1).first[:params]["name"]).to eq("from.env")
    end
  end

  describe "stop and shutdown" do
    it "are idempotent and safe before configure (the pyroscope gem aborted there)" do
      out, err, status = run_ruby(<<~RUBY)
        require "pyroscope"
        Pyroscope.stop
        Pyroscope.shutdown
        Pyroscope.shutdown
        puts "ok"
      RUBY
      expect(status).to be_success, err
      expect(out).to eq("ok\n")
    end

    it "shutdown sends the last window, with a bounded wait when the server is gone" do
      configure(exit_timeout: 1)
      work.heavy(0.05)
      receiver.refuse!
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      described_class.shutdown
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 5 # bounded: 1 s asked
      described_class.shutdown
      receiver.accept!
    end

    it "stop is whole: an interrupt arriving while it runs never leaves the exporter running without the sampler" do
      configure(upload_interval: 60)
      stopper = Thread.current
      # the interrupt arrives right after the sampler stopped, where it is checked next
      tracer = TracePoint.new(:c_return) do |tp|
        next unless Thread.current == stopper && tp.method_id == :stop && tp.self == Pyroscope::Native

        tracer.disable
        Thread.new { stopper.raise("interrupt during stop") }.join
      end
      tracer.enable
      expect { described_class.stop }.to raise_error(RuntimeError, "interrupt during stop")
      expect(Pyroscope::Native.running?).to be(false)
      # told to stop, the exporter's thread ends (stop does not wait for it: join(0))
      exporters = Thread.list.select { |t| t.alive? && t.name == "pyroscope-exporter" }
      expect(exporters.map { |t| t.join(10) }).to all(be_a(Thread))
    ensure
      tracer&.disable
    end

    it "shutdown keeps waiting for the last window when an interrupt (here a signal trap) wakes it" do
      configure(exit_timeout: 5)
      work.heavy(0.05)
      receiver.mode = [:stall, 1] # the last window takes 1 s to be taken
      trapped = 0
      previous = trap("USR1") { trapped += 1 }
      Thread.new { sleep 0.3; Process.kill(:USR1, Process.pid) }
      described_class.shutdown
      expect(trapped).to eq(1) # the wait was interrupted, and the trap ran
      expect(receiver.accepted.size).to eq(1)
      expect(Pyroscope::Native.upload_stats[:queued_windows]).to eq(0)
    ensure
      trap("USR1", previous || "DEFAULT")
    end
  end

  describe "tags" do
    before { configure }

    it "tag_wrapper nests, restores the outer values, also through exceptions" do
      described_class.tag_wrapper({ "a" => "outer", "b" => 1 }) do
        described_class.tag_wrapper({ "a" => "inner", "c" => :x }) do
          expect(Pyroscope::Native.labels).to eq("a" => "inner", "b" => "1", "c" => "x")
        end
        expect(Pyroscope::Native.labels).to eq("a" => "outer", "b" => "1")
        expect { described_class.tag_wrapper({ "a" => "boom" }) { raise "x" } }.to raise_error("x")
        expect(Pyroscope::Native.labels).to eq("a" => "outer", "b" => "1")
      end
      expect(Pyroscope::Native.labels).to eq({})
    end

    it "takes any key and value by to_s, removes nil ones, keeps tags set inside it, and names a bad argument" do
      described_class.tag_wrapper({ "kept" => "k", "gone" => "g" }) do
        described_class.tag_wrapper({ 7 => 1.5, a: :b, "a" => "later", "gone" => nil }) do
          expect(Pyroscope::Native.labels).to eq("kept" => "k", "7" => "1.5", "a" => "later")
          described_class._add_tags({ "inside" => "i" })
        end
        expect(Pyroscope::Native.labels).to eq("kept" => "k", "gone" => "g", "inside" => "i")
        expect { described_class.tag_wrapper([%w[a b]]) { raise "not reached" } }
          .to raise_error(ArgumentError, /tags must be a Hash, got \[\["a", "b"\]\]/)
        expect { described_class.tag_wrapper({ "" => "x" }) { raise "not reached" } }.to raise_error(ArgumentError, /key must not be empty/)
        expect(Pyroscope::Native.labels).to eq("kept" => "k", "gone" => "g", "inside" => "i")
      end
      expect(Pyroscope::Native.labels).to eq("inside" => "i")
    end

    it "puts a tag on exactly the samples taken while it was set" do
      described_class.tag_wrapper({ "vehicle" => "bike" }) { work.worker_one(0.15) }
      work.worker_two(0.15)
      described_class.shutdown
      receiver.wait_for(1)
      samples = receiver.samples
      bike = samples.select { |s| s[:labels]["vehicle"] == "bike" }
      other = samples - bike
      expect(bike.flat_map { |s| s[:frames] }.map(&:first)).to include("Workload#worker_one")
      expect(bike.flat_map { |s| s[:frames] }.map(&:first)).not_to include("Workload#worker_two")
      expect(other.flat_map { |s| s[:frames] }.map(&:first)).not_to include("Workload#worker_one")
    end

    it "_add_tags and _remove_tags work in both call forms, for this and another thread" do
      described_class._add_tags({ "one" => "arg" })
      described_class._add_tags(described_class.thread_id, { "two" => "args" })
      expect(Pyroscope::Native.labels).to eq("one" => "arg", "two" => "args")
      described_class._remove_tags(described_class.thread_id, { "two" => "args" })
      described_class._remove_tags({ "one" => "arg" })
      expect(Pyroscope::Native.labels).to eq({})

      ready = Queue.new
      go = Queue.new
      other = Thread.new do
        ready << described_class.thread_id
        go.pop
        Pyroscope::Native.labels
      end
      id = ready.pop
      described_class._add_tags(id, { "set" => "from outside" })
      described_class._add_tags(id, { region: :eu, "n" => 7 }) # merged; keys and values by their to_s
      described_class._remove_tags(id, ["n"])
      go << true
      expect(other.value).to eq("set" => "from outside", "region" => "eu")
    end

    it "merges another thread's thread-wide tags as a fiber's: the previous values back, nil removes a key" do
      native = Pyroscope::Native
      go = Queue.new
      other = Thread.new { go.pop }
      Thread.pass until other.native_thread_id
      expect(native.change_thread_tags(other, { "a" => "1", "b" => "x" })).to eq("a" => nil, "b" => nil)
      previous = native.change_thread_tags(other, { "a" => 2, :b => nil, "c" => "3" })
      expect(previous).to eq("a" => "1", "b" => "x", "c" => nil)
      expect(native.change_thread_tags(other, previous)).to eq("a" => "2", "b" => nil, "c" => "3")
      expect { native.change_thread_tags(other, "a=1") }.to raise_error(ArgumentError, /tags must be a Hash/)
      go << true
      other.join
      expect(native.change_thread_tags(other, { "late" => "x" })).to be_nil # ended: no entry
    end

    it "tag and remove_tags still work, with a deprecation warning" do
      expect { described_class.tag({ "old" => "api" }) }.to output(/Pyroscope.tag is deprecated/).to_stderr
      expect(Pyroscope::Native.labels).to eq("old" => "api")
      expect { described_class.remove_tags("old") }.to output(/remove_tags is deprecated/).to_stderr
      expect(Pyroscope::Native.labels).to eq({})
    end

    it "ignores tags for a thread that no longer exists" do
      dead = Thread.new { described_class.thread_id }.value
      expect { described_class._add_tags(dead, { "late" => "1" }) }.not_to raise_error
    end
  end

  it "adds pid, thread_id and global tags to the samples when asked" do
    configure(report_pid: true, report_thread_id: true, tags: { "region" => "eu" })
    other = Thread.new { work.heavy(0.05) && described_class.thread_id }
    work.heavy(0.05)
    other_id = other.value
    described_class.shutdown
    receiver.wait_for(1)
    labels = receiver.samples.map { |s| s[:labels] }
    expect(labels.map { |l| l["pid"] }.uniq).to eq([Process.pid.to_s])
    expect(labels.map { |l| l["region"] }.uniq).to eq(["eu"])
    expect(labels.map { |l| l["thread_id"] }).to include(described_class.thread_id.to_s, other_id.to_s)
  end

  describe "fork and exec" do
    it "restarts profiling in a forked child, which uploads its own profile; neither hangs at exit" do
      configure(report_pid: true)
      work.heavy(0.05)
      pid = fork do
        Workload.new.worker_two(0.2)
        exit!(Pyroscope::Native.running? ? 0 : 3) if ENV["NEVER"]
        Pyroscope.shutdown
        exit!(Pyroscope::Native.upload_stats[:windows_sent].positive? ? 0 : 4)
      end
      _, status = Process.wait2(pid)
      expect(status.exitstatus).to eq(0)
      work.heavy(0.05)
      described_class.shutdown
      receiver.wait_for(2)
      pids = receiver.samples.group_by { |s| s[:labels]["pid"] }
      expect(pids.keys).to contain_exactly(Process.pid.to_s, pid.to_s)
      expect(pids[pid.to_s].flat_map { |s| s[:frames] }.map(&:first)).to include("Workload#worker_two")
      expect(pids[Process.pid.to_s].flat_map { |s| s[:frames] }.map(&:first)).not_to include("Workload#worker_two")
    end

    it "a child's upload counters are its own, not its parent's" do
      configure(upload_interval: 0.2)
      work.heavy(0.05)
      receiver.wait_for(1)
      Pyroscope::Native.flush(5)
      parent = Pyroscope::Native.upload_stats
      expect(parent[:windows_sent]).to be_positive
      reader, writer = IO.pipe
      pid = fork do
        writer.write(Marshal.dump(Pyroscope::Native.upload_stats.slice(:windows_sent, :windows_dropped, :requests, :bytes_sent)))
        exit!(0)
      end
      writer.close
      child = Marshal.load(reader.read)
      Process.wait(pid)
      expect(child).to eq(windows_sent: 0, windows_dropped: 0, requests: 0, bytes_sent: 0)
    end

    it "a child that exits normally sends its last window from its own at_exit" do
      out, err, status = run_ruby(<<~RUBY)
        require "pyroscope"
        Pyroscope.configure { |c| c.application_name = "fork.app"; c.server_address = #{receiver.url.inspect}; c.report_pid = true }
        burn = ->(s) { x = 0; t = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + s; x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < t }
        child = fork { burn.(0.1) }
        Process.wait(child)
        puts child
      RUBY
      expect(status).to be_success, err
      receiver.wait_for(1)
      expect(receiver.samples.map { |s| s[:labels]["pid"] }).to include(out.strip)
    end

    # A process forked by the test runs the scenario, so that the runner is never daemonized.
    # Returns the CPU of the samples its pid labels that are in its span's work.
    def forked_span_cpu(fork_code)
      out, err, status = run_ruby(<<~RUBY)
        require "pyroscope"
        require "pyroscope/otel"
        require "fiddle"
        Pyroscope.configure do |c|
          c.application_name = "forked.app"
          c.server_address = #{receiver.url.inspect}
          c.report_pid = true
        end
        provider = OpenTelemetry::SDK::Trace::TracerProvider.new
        provider.add_span_processor(Pyroscope::Otel::SpanProcessor.new("forked.app", #{receiver.url.inspect}))
        def forked_work(seconds)
          x = 0
          stop_at = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + seconds
          x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < stop_at
        end
        in_child = lambda do
          puts Process.pid
          $stdout.flush
          provider.tracer("forked").in_span("ForkedJob") { forked_work(0.3) }
          # its windows go out as they end, not only at exit (the restart may run on a thread
          # of its own, which a bare fork()'s child on 3.1 lets run only when it blocks)
          exporter = 50.times.any? { Thread.list.any? { |t| t.alive? && t.name == "pyroscope-exporter" } || !sleep(0.1) }
          puts "exporter: \#{exporter}"
          $stdout.flush
        end
        #{fork_code}
      RUBY
      expect(status).to be_success, err
      # the restart ran where it could lock (a postponed job cannot: "trap context")
      expect(out).to include("exporter: true"), "#{out}\n#{err}"
      expect(err).not_to include("not profiling")
      child = out.lines.grep(/\A\d+$/).last.strip
      count = 1
      count += 1 until receiver.wait_for(count).flat_map { |r| r[:samples] }.any? { |s| s[:labels]["pid"] == child }
      receiver.samples.select { |s| s[:labels]["pid"] == child && s[:labels]["span"] == "ForkedJob" }
              .select { |s| s[:frames].any? { |f| f[0] == "Object#forked_work" } }.sum { |s| s[:cpu_ns] }
    end

    it "keeps profiling a daemon (Process.daemon forks without Process._fork), under its own pid" do
      cpu = forked_span_cpu(<<~RUBY)
        pid = fork do
          Process.daemon(true, true) # stdout stays open: the spec reads it until the daemon exits
          in_child.call
        end
        Process.wait(pid)
      RUBY
      expect(cpu).to be > 150_000_000
    end

    it "keeps profiling a child of a C-level fork() (no Process._fork), under its own pid" do
      skip "Ruby >= 3.3 itself hangs a child of a bare fork() of a process with a second thread" if Gem::Version.new(RUBY_VERSION) >= Gem::Version.new("3.3")

      cpu = forked_span_cpu(<<~RUBY)
        bare_fork = Fiddle::Function.new(Fiddle::Handle::DEFAULT["fork"], [], Fiddle::TYPE_INT, need_gvl: true)
        pid = bare_fork.call
        if pid.zero?
          in_child.call
          Pyroscope.shutdown
          exit!(0) # Ruby's own exit would wait for the parent's threads, which this child does not have
        end
        Process.wait(pid)
      RUBY
      expect(cpu).to be > 150_000_000
    end

    it "keeps exec private as Kernel has it, and profiling on when exec fails" do
      expect(Object.new.respond_to?(:exec)).to be(false)
      expect(Kernel.private_method_defined?(:exec)).to be(true)
      expect([Kernel.respond_to?(:exec), Process.respond_to?(:exec)]).to eq([true, true])
      Pyroscope::Native.start(sample_rate: 1000)
      missing = "/nonexistent/pyroscope-spec-#{Process.pid}"
      [-> { exec(missing) }, -> { Kernel.exec(missing) }, -> { Process.exec(missing, close_others: true) }].each do |call|
        expect(&call).to raise_error(Errno::ENOENT)
        expect(Pyroscope::Native).to be_running
      end
      Pyroscope::Native.take_window
      work.heavy(0.05)
      expect(take_samples.sum { |s| s[2] }).to be > 25_000_000
    end

    it "exec after profiling at 1000 Hz never dies of a pending SIGPROF" do
      10.times do
        _, err, status = run_ruby(<<~RUBY)
          require "pyroscope"
          Pyroscope::Native.start(sample_rate: 1000)
          x = 0
          t = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + 0.05
          x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < t
          exec("sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 7")
        RUBY
        expect(status.exitstatus).to eq(7), "#{status.inspect} #{err}"
      end
    end
  end
end
