# frozen_string_literal: true

require "logger"
require "opentelemetry/sdk"
require "pyroscope/cli"
require "pyroscope/otel"

# Profile type :wall: where a span's time went, measured around the code itself. Real
# threads, a pipe, sleeps, a thread hogging the GVL, the real opentelemetry-sdk, and the
# contract receiver decoding what was uploaded.
RSpec.describe "Wall-clock profiles (profile_types [:cpu, :wall])" do
  let(:native) { Pyroscope::Native }
  let(:work) { Workload.new }

  def mono = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  def sleep_frame?(name) = name.match?(WallSpans::SLEEP_FRAME)

  def config(**members)
    Pyroscope::Config.new.tap do |c|
      c.application_name = "a"
      members.each { |k, v| c[k] = v }
    end
  end

  describe "configuration" do
    it "defaults to [:cpu], reads PYROSCOPE_PROFILE_TYPES and refuses what it does not know, naming it" do
      expect(Pyroscope::Config.new.profile_types).to eq([:cpu])
      expect(config.apply_env("PYROSCOPE_PROFILE_TYPES" => "cpu, wall").profile_types).to eq(%w[cpu wall])
      expect { config(profile_types: %i[cpu walls]).validate! }
        .to raise_error(ArgumentError, /profile_types: unknown profile type :walls/)
      expect { config(profile_types: %w[cpu gpu]).validate! }.to raise_error(ArgumentError, /unknown profile type "gpu"/)
      expect { config(profile_types: [:wall]).validate! }.to raise_error(ArgumentError, /must include :cpu/)
      expect { config(profile_types: "cpu").validate! }.to raise_error(ArgumentError, /profile_types must be an Array/)
      expect { config(wall_scope: :idle).validate! }.to raise_error(ArgumentError, /wall_scope .*:idle/)
      expect { native.start(wall: "yes") }.to raise_error(ArgumentError, /wall must be true or false/)
    end

    it "refuses :wall where Ruby has no GVL hand-over events (3.1), naming the version; takes it elsewhere" do
      config = config().apply_env("PYROSCOPE_PROFILE_TYPES" => "cpu,wall")
      if native::WALL_SUPPORTED
        expect(config.validate!.profile_types).to eq(%i[cpu wall])
        expect(native.start(wall: true)).to be(true)
      else
        expect { config.validate! }.to raise_error(ArgumentError, /:wall needs Ruby >= 3.2.*Ruby #{Regexp.escape(RUBY_VERSION)}/)
        expect { native.start(wall: true) }.to raise_error(ArgumentError, /Ruby #{Regexp.escape(RUBY_VERSION)}/)
        expect(native.running?).to be(false)
      end
    end

    it "leaves CPU profiles as they were without :wall: one sample type, no wall values" do
      native.start(sample_rate: 1000)
      native.set_labels({ "span" => "s" })
      work.heavy(0.05)
      sleep 0.02
      native.clear_labels
      native.stop
      window = native.take_window
      expect(window[:samples].sum { |s| s[2] }).to be > 0
      expect(window[:samples].map { |s| s[4] }.uniq).to eq([0])
      gz = native._encode(window, [100, Dir.pwd, [], nil])
      types = gz.map { |g| p = PprofDecoder.decode(PprofDecoder.gunzip(g)); p.sample_type.map { |t| p.string_table[t.type] } }
      expect(types.uniq).to eq([["cpu"]])
    end
  end

  context "on Ruby >= 3.2" do
    before { skip "Ruby #{RUBY_VERSION} has no GVL hand-over events: :wall is refused" unless native::WALL_SUPPORTED }

    describe "spans that compute, sleep and wait on a pipe while another thread hogs the GVL" do
      let(:receiver) { ContractReceiver.new }

      after do
        Pyroscope.shutdown
        receiver.close
      end

      it "charges every span its duration, the sleep and the read their own wall time, and keeps its CPU" do
        configure_pyroscope("wall.spec", receiver.url, profile_types: %i[cpu wall])
        spans = WallSpans.new(receiver.url)
        measured = spans.run(6)
        Pyroscope.shutdown
        receiver.wait_for(2)
        expect(receiver.violations).to be_empty
        ids = receiver.accepted.flat_map { |r| r[:profile_type_ids] }.uniq.sort
        expect(ids).to eq(%w[process_cpu:cpu:nanoseconds:cpu:nanoseconds wall:wall:nanoseconds:wall:nanoseconds])

        waited = 0
        spans.finished.finished_spans.each do |span|
          id = span.attributes["pyroscope.profile.id"]
          m = measured.fetch(id)
          mine = receiver.samples.select { |s| s[:labels]["span_id"] == id || s[:labels]["profile_id"] == id }
          got = WallSpans.profiled(mine.map { |s| [s[:frames].map(&:first), s[:cpu_ns], s[:wall_ns]] })
          duration = (span.end_timestamp - span.start_timestamp) / 1e9
          expect(got[:total]).to be_within(0.1 * duration).of(duration)
          expect(got[:sleep]).to be_within(0.15 * m[:sleep]).of(m[:sleep])
          expect(got[:read]).to be_within(0.15 * m[:read]).of(m[:read])
          expect(got[:cpu]).to be_within(0.2 * m[:cpu] + 0.002).of(m[:cpu])
          waited += got[:gvl]
        end
        expect(waited).to be > 0.05 # the hog held the GVL when the sleeps and reads ended
      end
    end

    it "leaves idle threads out unless wall_scope is :all: a worker waiting on its queue" do
      [false, true].each do |all|
        native.start(wall: true, wall_all: all)
        queue = Queue.new
        idle = Thread.new { queue.pop }
        sleep 0.2
        queue << :go
        idle.join
        native.stop
        waiting = native.take_window[:samples].select { |frames, *| frames.first&.first == "Thread::Queue#pop" }
        if all
          expect(waiting.sum { |s| s[4] } / 1e9).to be_within(0.05).of(0.2)
        else
          expect(waiting).to be_empty
        end
      end
    end

    it "charges a fiber scheduler's task the time it waits on IO, in its own span" do
      require "async"
      native.start(wall: true)
      reader, writer = IO.pipe
      waited = nil
      Async do |task|
        task.async do
          native.set_labels({ "span" => "task" }) # a fiber's own labels
          t = mono
          reader.read(1)
          waited = mono - t
          native.clear_labels
        end
        task.async do
          sleep 0.1
          writer.write("x")
        end
      end
      native.stop
      mine = native.take_window[:samples].select { |_, labels, *| labels["span"] == "task" }
      on_read = mine.select { |frames, *| frames.any? { |name, *| name == "IO#read" } }.sum { |s| s[4] } / 1e9
      expect(mine.sum { |s| s[4] } / 1e9).to be_within(0.1 * waited).of(waited)
      # the task was suspended in the read from its start until the writer's 0.1 s sleep
      # ended, at least; its own code in the read (the scheduler's) runs on the CPU side
      expect(on_read).to be_between(0.085, waited * 1.02)
    end

    it "keeps the wall in no_signals mode and in a forked child" do
      native.start(wall: true, no_signals: true)
      native.set_labels({ "span" => "quiet" })
      t = mono
      sleep 0.05
      slept = mono - t
      work.heavy(0.02)
      spent = mono - t
      native.clear_labels
      native.stop
      samples = native.take_window[:samples].select { |_, labels, *| labels["span"] == "quiet" }
      expect(samples.sum { |s| s[4] } / 1e9).to be_within(0.1 * spent).of(spent)
      on_sleep = samples.select { |f, *| f.any? { |n, *| sleep_frame?(n) } }.sum { |s| s[4] } / 1e9
      expect(on_sleep).to be_within(0.15 * slept).of(slept)

      dir = Dir.mktmpdir("wall-fork")
      configure_pyroscope("wall.fork", "file://#{dir}", profile_types: %i[cpu wall])
      pid = fork do # the child restarts profiling as it was configured, :wall included
        Pyroscope.tag_wrapper({ "span" => "child" }) { sleep 0.1 }
        Pyroscope.shutdown
        exit!(0)
      end
      Process.wait(pid)
      child = Pyroscope::Flamegraph.load([dir]).of(:wall).filter({ "span" => "child" })
      expect(child.total_ns / 1e9).to be_within(0.02).of(0.1)
    ensure
      Pyroscope.shutdown
      FileUtils.rm_rf(dir) if dir
    end

    it "writes local files with both types, which the CLI graphs by wall time and lists per span" do
      dir = Dir.mktmpdir("wall-local")
      configure_pyroscope("wall.local", "file://#{dir}", profile_types: %i[cpu wall])
      started = mono
      slept = nil
      Pyroscope.tag_wrapper({ "profile_id" => "00000000000000aa", "span" => "Slow" }) do
        work.heavy(0.02)
        t = mono
        sleep 0.15
        slept = mono - t
      end
      spent = mono - started
      Pyroscope.shutdown
      files = Dir[File.join(dir, "**", "*.pb.gz")]
      profile = PprofDecoder.decode(PprofDecoder.gunzip(File.binread(files.first)))
      expect(profile.sample_type.map { |t| profile.string_table[t.type] }).to eq(%w[cpu wall])
      out = StringIO.new
      html = File.join(dir, "wall.html")
      expect(Pyroscope::CLI.new(out: out, err: out).run(["flamegraph", "--type", "wall", "-o", html, dir])).to eq(0)
      expect(out.string).to match(/of wall time/)
      wall = Pyroscope::Flamegraph.load([dir]).of(:wall)
      expect(wall.tree[:value] / 1e9).to be_within(0.1 * spent).of(spent)
      on_sleep = wall.samples.select { |s| s.frames.any? { |n, *| sleep_frame?(n) } }.sum(&:wall_ns) / 1e9
      expect(on_sleep).to be_within(0.15 * slept).of(slept)
      out = StringIO.new
      expect(Pyroscope::CLI.new(out: out, err: out).run(["spans", dir])).to eq(0)
      expect(out.string.lines.first).to match(/CPU .* wall/)
      listed = out.string[/00000000000000aa\s+Slow\s+\S+ ms\s+\S+%\s+(\d+) ms/, 1]
      expect(Integer(listed) / 1e3).to be_within(0.1 * spent).of(spent)
    ensure
      FileUtils.rm_rf(dir) if dir
    end
  end
end
