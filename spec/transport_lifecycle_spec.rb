# frozen_string_literal: true

require "json"
require "securerandom"
require "time"

# The uploader over a process's whole life (transport.c): reconfigured while a POST is in
# flight, stopped at exit during an HTTPS upload, forked while it talks TLS, told to come
# back at a date. Real TLS to a local receiver that trusts only the spec's own CA.
RSpec.describe "The uploader's lifecycle" do
  let(:native) { Pyroscope::Native }
  let(:ca) { TestCA.new }

  after { ca.remove }

  def configure(ca_file, headers: [], user_agent: "pyroscope-otel/spec", timeout_ms: 10_000, attempts: 3)
    native._configure_transport(["Content-Type: binary/octet-stream", "Content-Encoding: gzip", *headers], 2000,
                                timeout_ms, 100, 64 << 20, attempts, user_agent, ca_file, 1 << 20)
  end

  def window(samples)
    now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
    { samples: samples, started_at_ns: now - 1_000_000_000, ended_at_ns: now, dropped_samples: 0, dropped_cpu_ns: 0 }
  end

  def enqueue(receiver, app)
    from = Time.now.to_i / 10 * 10
    native._enqueue(window([[[["A#b", "#{Dir.pwd}/app/a.rb", 3]], {}, 1_000, 1]]), [100, Dir.pwd, [], nil],
                    "#{receiver.url}/ingest?name=#{app}&from=#{from}&until=#{from + 10}&format=pprof" \
                    "&sampleRate=100&spyName=rbspy", "#{receiver.url}/ingest")
  end

  # Before: the header list was freed by a reconfigure while libcurl walked it (ASan:
  # heap-use-after-free in Curl_add_custom_headers), and the user agent was read unlocked.
  it "sends each request with one configuration while 50 reconfigures change the headers" do
    receiver = ContractReceiver.new(tls: ca.context)
    receiver.handshake_delay = 0.03 # the request's headers are built after the handshake
    receiver.mode = [:stall_body, 0.03]
    configure(ca.ca_file, headers: ["X-Gen-A: 0", "X-Gen-B: 0"], user_agent: "pyroscope-otel/spec gen-0")
    sent = native.upload_stats[:windows_sent]
    12.times { enqueue(receiver, "reconf.app") }
    1.upto(50) do |gen|
      configure(ca.ca_file, headers: ["X-Gen-A: #{gen}", "X-Gen-B: #{gen}"], user_agent: "pyroscope-otel/spec gen-#{gen}")
      enqueue(receiver, "reconf.app") if gen % 5 == 0
      sleep 0.01
    end
    expect(native.flush(60)).to be(true)
    expect(native.upload_stats[:windows_sent] - sent).to eq(22)
    expect(receiver.violations).to be_empty
    generations = receiver.accepted.map { |r| r[:headers].values_at("x-gen-a", "x-gen-b", "user-agent") }
    expect(generations.size).to eq(22)
    generations.each do |a, b, agent|
      expect([b, agent]).to eq([a, "pyroscope-otel/spec gen-#{a}"]), generations.inspect
    end
    expect(generations.map(&:first).uniq.size).to be > 1 # the reconfigures happened during the uploads
  ensure
    receiver&.close
  end

  # Before: exit ran OpenSSL's cleanup (atexit) under the uploader's TLS writes of a window
  # the flush had given up on.
  it "stops the uploader at exit, in the middle of an HTTPS upload, without a crash" do
    receiver = ContractReceiver.new(tls: ca.context, receive_buffer: 4096)
    receiver.mode = [:trickle, 512, 0.002] # the body takes seconds: still being written at exit
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      require "securerandom"
      native = Pyroscope::Native
      native._configure_transport(["Content-Type: binary/octet-stream", "Content-Encoding: gzip"], 2000, 60_000,
                                  10, 64 << 20, 1, "pyroscope-otel/spec", #{ca.ca_file.inspect}, 1 << 20)
      # random names: a body gzip cannot shrink
      samples = Array.new(6000) { |i| [[[SecureRandom.hex(24), "/app/\#{SecureRandom.hex(24)}.rb", i + 1]], {}, 1000, 1] }
      now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
      from = Time.now.to_i / 10 * 10
      native._enqueue({ samples: samples, started_at_ns: now - 1_000_000_000, ended_at_ns: now, dropped_samples: 0,
                        dropped_cpu_ns: 0 }, [100, Dir.pwd, [], nil],
                      "#{receiver.url}/ingest?name=exit.app&from=\#{from}&until=\#{from + 10}&format=pprof&sampleRate=100&spyName=rbspy",
                      "#{receiver.url}/ingest")
      puts native.flush(0.5) ? "drained" : "in flight"
    RUBY
    expect(out).to eq("in flight\n"), err # the precondition: the exit happened during the upload
    expect(status).to be_success, "#{status.inspect}\n#{err}"
    expect(err).not_to match(/Sanitizer|SEGV|\[BUG\]/)
  ensure
    receiver&.close
  end
  # Before: a fork during a TLS upload could leave OpenSSL's and libcurl's locks held in the
  # child, and a child exiting during its own upload ran OpenSSL's cleanup under it. Each
  # child sends its window, then exits (normally) in the middle of one more upload; the
  # parent keeps its uploader in TLS writes all along.
  it "survives a storm of forks during TLS uploads: every child uploads its own windows and exits 0" do
    receiver = ContractReceiver.new(tls: ca.context, receive_buffer: 4096)
    receiver.mode = [:trickle, 256, 0.003] # each upload lasts a while: forks and exits land in them
    out, err, status = run_ruby(<<~RUBY)
      require "pyroscope"
      require "json"
      require "logger"
      require "securerandom"
      native = Pyroscope::Native
      exporter = lambda do
        Pyroscope::Exporter.new(application_name: "fork.tls", server_address: #{receiver.url.inspect},
                                logger: Logger.new($stderr, level: :error), ca_file: #{ca.ca_file.inspect},
                                upload_interval: 1, connect_timeout: 2, timeout: 30,
                                tags: { "pid" => Process.pid.to_s }).tap(&:start)
      end
      # a window of random names (gzip cannot shrink it): its upload takes a second or more
      big_upload = lambda do
        samples = Array.new(2000) { |i| [[[SecureRandom.hex(24), "/app/\#{SecureRandom.hex(24)}.rb", i + 1]], {}, 1000, 1] }
        now = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
        from = Time.now.to_i
        native._enqueue({ samples: samples, started_at_ns: now - 1_000_000_000, ended_at_ns: now, dropped_samples: 0,
                          dropped_cpu_ns: 0 }, [100, Dir.pwd, [], nil],
                        "#{receiver.url}/ingest?name=big.app&from=\#{from}&until=\#{from + 1}&format=pprof&sampleRate=100&spyName=rbspy",
                        "#{receiver.url}/ingest")
      end
      burn = ->(s) { x = 0; t = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) + s; x += 1 while Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID) < t }
      native.start
      exporter.call
      # The parent's uploader is in one long TLS upload during the whole storm, encoded
      # before it, and the burning thread is started before it too: ASan's allocator (GCC
      # 12's) is not fork-safe, so a fork while another thread allocates (an encoding, a
      # new thread's start) can hang the child in it (seen, with gdb), whatever this gem does.
      big_upload.call
      big_upload.call
      Thread.new { loop { burn.(0.1); sleep 0.05 } } # and takes windows all along
      sleep 0.5
      children = []
      6.times do
        4.times do
          children << fork do
            native.start
            mine = exporter.call
            burn.(0.3)
            exit 5 unless mine.stop(timeout: 30) # its window, sent
            big_upload.call
            sleep 0.05
            exit 0 # during that upload
          end
        end
        sleep 0.07
      end
      mono = -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) }
      results = children.map do |pid|
        deadline = mono.() + 60 # a hang detector only: a child takes about a second
        status = nil
        sleep 0.05 until (status = Process.wait2(pid, Process::WNOHANG)&.last) || mono.() > deadline
        next [pid, "hung"].tap { Process.kill(:KILL, pid) && Process.wait(pid) } unless status

        [pid, status.exitstatus || status.inspect]
      end
      puts JSON.generate(results)
    RUBY
    expect(status).to be_success, "#{status.inspect}\n#{err}"
    results = JSON.parse(out.lines.last)
    expect(results.size).to eq(24)
    expect(results.reject { |_, code| code == 0 }).to eq([]), "#{results}\n#{err}"
    uploaded = receiver.samples.map { |s| s[:labels]["pid"] }.uniq
    expect(results.map { |pid, _| pid.to_s } - uploaded).to eq([]), "#{uploaded} #{receiver.requests.size}\n#{err}"
    expect(receiver.violations).to be_empty
    expect(err).not_to match(/Sanitizer|SEGV|\[BUG\]/)
  ensure
    receiver&.close
  end

  # Before: the date parsed as 0 seconds, and the retry came at once.
  it "waits until the HTTP date a 503's Retry-After names" do
    receiver = ContractReceiver.new
    configure(nil)
    at = Time.now.to_i + 3
    receiver.mode = [:retry_after_date, Time.at(at).httpdate]
    enqueue(receiver, "date.app")
    sleep 0.01 while receiver.requests.empty? # (no flush: it would make the retry due at once)
    receiver.mode = :ok
    receiver.wait_for(1, timeout: 30)
    first, second = receiver.requests
    expect(first[:status]).to eq(503)
    # `at` is a whole second 2-3 s after the first answer: the retry comes no sooner than 2 s after it
    expect(second[:at] - first[:at]).to be >= 1.9
  ensure
    receiver&.close
  end

  # A wall-clock step cannot be made here (it needs root): read from the sources instead.
  # A condition variable waits on CLOCK_REALTIME unless told otherwise, so a clock set back
  # an hour stretched every timed wait (the exit flush's) by as much.
  it "waits on the monotonic clock: every condition variable in ext/ is set to it" do
    dir = File.expand_path("../ext/pyroscope_otel", __dir__)
    code = Dir[File.join(dir, "*.c")].to_h { |f| [File.basename(f), File.read(f).gsub(%r{/\*.*?\*/}m, "")] }
    waiting = code.select { |_, text| text.match?(/pthread_cond_(timed)?wait\(/) }
    expect(waiting.keys).to include("transport.c")
    waiting.each do |file, text|
      expect(text).not_to include("PTHREAD_COND_INITIALIZER"), file
      expect(text).to match(/pthread_condattr_setclock\(&(\w+), CLOCK_MONOTONIC\)/), file
      attr = text[/pthread_condattr_setclock\(&(\w+), CLOCK_MONOTONIC\)/, 1]
      expect(text.scan(/pthread_cond_init\(&\w+, ([^)]*)\)/).flatten.uniq).to eq(["&#{attr}"]), file
    end
    # wall time only where a window's timestamps are read
    expect(code.select { |_, text| text.include?("CLOCK_REALTIME") }.keys).to eq(["cpu_clock.c"])
  end
end
