# frozen_string_literal: true

require "etc"
require "net/http"
require "socket"
require "tmpdir"

# At 1 000 Hz with 8 busy threads, blocking calls in other threads must neither fail with
# EINTR nor return partial results: the handler is installed with SA_RESTART and only the
# busy threads' own CPU timers fire, each at its own thread.
RSpec.describe "Blocking calls under profiling signals" do
  let(:native) { Pyroscope::Native }

  # a tree of 40 x 50 files for Dir.glob
  def make_tree(root)
    40.times do |d|
      dir = File.join(root, "d#{d}")
      Dir.mkdir(dir)
      50.times { |f| File.write(File.join(dir, "f#{f}.txt"), "x") }
    end
  end

  it "sees no EINTR and no partial result in pipe reads, sleep, Queue, ConditionVariable, IO.select, " \
     "Dir.glob, system, Net::HTTP and accept" do
    Dir.mktmpdir("pyroscope-eintr") do |root|
      make_tree(root)
      server = TCPServer.new("127.0.0.1", 0)
      http_port = server.addr[1]
      http = Thread.new do
        loop do
          client = server.accept
          client.gets
          while (line = client.gets) && line != "\r\n"; end
          body = "y" * 100_000
          client.write("HTTP/1.1 200 OK\r\nContent-Length: #{body.bytesize}\r\nConnection: close\r\n\r\n#{body}")
          client.close
        end
      rescue IOError
        nil
      end

      native.start(sample_rate: 1000)
      stop = false
      # CPU-bound throughout (their CPU timers fire), but passing the GVL now and then: among pure
      # spinners Ruby 3.4 starves a thread coming back from a GVL-free call (Dir.glob's per-file
      # calls: 200 files took > 200 s with 8 spinners and no profiler at all).
      busy = Array.new(8) { Thread.new { x = 0; (10_000.times { x += 1 }; Thread.pass) until stop; x } }
      errors = Queue.new
      check = lambda do |name, &blk|
        Thread.new do
          # at least 3 rounds, and for at least 2 s of signals
          t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
          rounds = 0
          until rounds >= 3 && Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0 >= 2
            blk.call
            rounds += 1
          end
        rescue StandardError => e
          errors << "#{name}: #{e.class}: #{e.message}"
        end
      end
      waiters = []
      waiters << check.call("pipe read") do
        r, w = IO.pipe
        writer = Thread.new { 10.times { sleep 0.002; w.write("a" * 1000) }; w.close }
        data = r.read
        writer.join
        raise "partial pipe read: #{data.bytesize}" unless data.bytesize == 10_000
      end
      waiters << check.call("sleep") do
        t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        sleep 0.01
        raise "short sleep" if Process.clock_gettime(Process::CLOCK_MONOTONIC) - t < 0.0095
      end
      waiters << check.call("Queue#pop") do
        q = Queue.new
        Thread.new { sleep 0.005; q << :ok }
        raise "queue" unless q.pop == :ok
      end
      waiters << check.call("ConditionVariable#wait") do
        m = Mutex.new
        cv = ConditionVariable.new
        ready = false
        Thread.new { sleep 0.005; m.synchronize { ready = true; cv.signal } }
        m.synchronize { cv.wait(m, 1) until ready }
      end
      waiters << check.call("IO.select") do
        r, w = IO.pipe
        writer = Thread.new { sleep 0.005; w.write("z") }
        raise "select timed out" unless IO.select([r], nil, nil, 2)
        writer.join
        r.close
        w.close
      end
      waiters << check.call("Dir.glob") do
        found = Dir.glob(File.join(root, "**", "*.txt"))
        raise "partial glob: #{found.size}" unless found.size == 2_000
      end
      waiters << check.call("system") { raise "system failed" unless system("true") }
      waiters << check.call("Net::HTTP") do
        body = Net::HTTP.get(URI("http://127.0.0.1:#{http_port}/"))
        raise "partial body: #{body.bytesize}" unless body.bytesize == 100_000
      end
      waiters << check.call("Socket#accept") do
        listener = TCPServer.new("127.0.0.1", 0)
        Thread.new { sleep 0.005; TCPSocket.new("127.0.0.1", listener.addr[1]).close }
        listener.accept.close
        listener.close
      end
      waiters.each(&:join)
      stop = true
      busy.each(&:join)
      samples = native.stats[:samples]
      native.stop
      server.close
      http.join
      expect(samples).to be > 100 # the busy threads were being signalled all along
      expect(Array.new(errors.size) { errors.pop }).to eq([])
    end
  end

  it "has a mode that sends no signal at all and still accounts the CPU" do
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      profs = 0
      trap("PROF") { profs += 1 } # ours would refuse to start next to this; no_signals never installs one
      native = Pyroscope::Native
      native.start(sample_rate: 200, no_signals: true)
      cpu = -> { Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) }
      burn = ->(s) { t = cpu.call + s; x = 0; x += 1 while cpu.call < t }
      spent = 0.0
      20.times do |i|
        native.set_labels({ "span" => i.to_s })
        t = cpu.call
        burn.call(0.02)
        spent += cpu.call - t
        native.clear_labels
      end
      stats = native.stats
      native.stop
      labelled = native.take_window[:samples].select { |_, l, *| l["span"] }
      puts [profs, stats[:samples], stats[:signal_handler_installed], (labelled.sum { |s| s[2] } / 1e9 / spent).round(3),
            labelled.map { |_, l, *| l["span"] }.uniq.size].join(" ")
    RUBY
    expect(status).to be_success, err
    profs, samples, installed, ratio, spans = out.split
    expect(profs).to eq("0")
    expect(installed).to eq("false")
    expect(ratio.to_f).to be_within(0.05).of(1.0) # every span's CPU, from label changes and jobs
    expect(spans).to eq("20")
    if RUBY_VERSION >= "3.3"
      expect(samples.to_i).to be > 20 # the ticker's postponed jobs sampled the busy thread
    else
      expect(samples).to eq("0")
      expect(err).to include("no_signals on Ruby < 3.3")
    end
  end
end
