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
