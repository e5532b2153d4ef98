# frozen_string_literal: true

require "rbconfig"

# Workloads with a known CPU cost, and readers for the windows the sampler returns.
module ProfileHelpers
  def thread_cpu
    Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  end

  # Burns `seconds` of this thread's CPU time in Ruby code.
  def burn(seconds)
    stop_at = thread_cpu + seconds
    x = 0
    x += 1 while thread_cpu < stop_at
    x
  end

  # A window that overflowed a 16-sample buffer: 40 label sets of 3 ms each at 1 000 Hz.
  def overflowed_window
    native = Pyroscope::Native
    native.start(max_samples: 16, sample_rate: 1000)
    work = Workload.new
    40.times do |i|
      native.set_labels({ "i" => i.to_s })
      work.heavy(0.003)
    end
    native.clear_labels
    native.stop
    native.take_window
  end

  # Runs `count` threads, each calling the block with its number, then burning `seconds`
  # in Workload#method; returns the CPU seconds they measured around the burning, summed.
  def burn_in_threads(count, method, seconds)
    work = Workload.new
    measured = Queue.new
    Array.new(count) do |i|
      Thread.new do
        yield i if block_given?
        before = thread_cpu
        work.public_send(method, seconds)
        measured << (thread_cpu - before)
      end
    end.each(&:join)
    Array.new(count) { measured.pop }.sum
  end

  # Pyroscope.configure as most examples need it: a name, a server (a URL or file://), a
  # silent logger unless given one, then any other members. Returns the configuration.
  def configure_pyroscope(name, server, logger: Logger.new(nil), **members)
    Pyroscope.configure do |c|
      c.application_name = name
      c.server_address = server
      c.logger = logger
      members.each { |k, v| c[k] = v }
    end
  end

  def take_samples
    Pyroscope::Native.take_window.fetch(:samples)
  end

  # CPU ns per key, the key computed from each sample's frames and labels.
  def cpu_by(samples)
    samples.each_with_object(Hash.new(0)) do |(frames, labels, cpu_ns, _count), acc|
      acc[yield(frames, labels)] += cpu_ns
    end
  end

  def frame_names(frames)
    frames.map(&:first)
  end

  def on_stack?(frames, method_name)
    frames.any? { |name, _file, _line| name.end_with?("##{method_name}", ".#{method_name}") }
  end

  # Runs the block in a child Ruby with this checkout on the load path; returns
  # [stdout, stderr, status].
  def run_ruby(code, env: {})
    require "open3"
    lib = File.expand_path("../../lib", __dir__)
    Open3.capture3(env, RbConfig.ruby, "-I", lib, "-e", code)
  end
end
