# frozen_string_literal: true

module Pyroscope
  # Pyroscope.stats: the profiler's own counters, under stable keys (README, "Self-metrics").
  # Counts are since the extension loaded in this process (a forked child starts from its
  # parent's, uploads excepted: the child has its own uploader); the CPU figures are since
  # profiling started in this process, so that the share compares like with like.
  module Stats
    KEYS = %i[running samples samples_dropped label_changes windows_sent windows_failed windows_dropped
              bytes_sent last_error profiler_cpu_ns process_cpu_ns profiler_cpu_share].freeze

    @since = nil # [pid, profiler CPU ns, process CPU ns] when profiling started here

    class << self
      # Called when profiling starts (configure, a fork's child): the CPU figures count from here.
      def start
        @since = [Process.pid, profiler_cpu_ns(Native.stats, Native.upload_stats), process_cpu_ns] unless @since&.first == Process.pid
      end

      def read
        sampler = Native.stats
        uploads = Native.upload_stats
        own, process = cpu_since_start(profiler_cpu_ns(sampler, uploads))
        { running: sampler[:running], samples: sampler[:samples], samples_dropped: sampler[:samples_dropped],
          label_changes: sampler[:label_changes], windows_sent: uploads[:windows_sent],
          windows_failed: uploads[:windows_failed], windows_dropped: uploads[:windows_dropped],
          bytes_sent: uploads[:bytes_sent], last_error: uploads[:last_error], profiler_cpu_ns: own,
          process_cpu_ns: process, profiler_cpu_share: own && process&.positive? ? own.fdiv(process) : nil }
      end

      private

      def cpu_since_start(profiler_now)
        return [nil, nil] unless @since&.first == Process.pid

        [profiler_now - @since[1], process_cpu_ns - @since[2]]
      end

      # Timer samples' walks and aggregation (on the sampled threads' clocks), the exports
      # (frames to strings, on the exporter's thread) and the uploader (encoding, gzip, HTTP),
      # from Native.stats and Native.upload_stats as read.
      def profiler_cpu_ns(sampler, uploads)
        sampler[:sampling_cpu_ns] + Exporter.cpu_ns + uploads[:cpu_ns]
      end

      def process_cpu_ns
        Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID, :nanosecond)
      end
    end
  end

  # The profiler's own metrics, for dashboards and troubleshooting: a Hash of Stats::KEYS.
  #   running             sampling now
  #   samples             timer samples taken
  #   samples_dropped     samples a full window refused (raise max_samples)
  #   label_changes       times a thread's labels changed (spans, tags)
  #   windows_sent        windows uploaded (or written, for a file:// target)
  #   windows_failed      windows the server refused, or that failed every attempt
  #   windows_dropped     windows dropped unsent: the queue over queue_max_windows/_bytes
  #   bytes_sent          gzipped bytes delivered
  #   last_error          the last upload failure (a String), or nil
  #   profiler_cpu_ns     this gem's own CPU since profiling started in this process
  #   process_cpu_ns      the process's CPU over the same time
  #   profiler_cpu_share  the first over the second (nil before configure)
  def self.stats
    Stats.read
  end
end
