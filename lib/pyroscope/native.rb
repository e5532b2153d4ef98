# frozen_string_literal: true

# A checkout's build lives in a directory per Ruby ABI (see Rakefile); an installed gem's
# beside this file.
checkout_build = File.join(__dir__, RbConfig::CONFIG["ruby_version"], "pyroscope_otel.#{RbConfig::CONFIG["DLEXT"]}")
File.exist?(checkout_build) ? require(checkout_build) : require_relative("pyroscope_otel")

module Pyroscope
  # The C extension's binding: the CPU sampler, the per-thread label slot and the window
  # of aggregated samples. The rest of the gem is built on these few calls.
  module Native
    DEFAULT_SAMPLE_RATE = 100
    DEFAULT_MAX_DEPTH = 512
    DEFAULT_MAX_SAMPLES = 65_536

    class << self
      # Starts sampling every Ruby thread on its own CPU time. Returns false when already
      # running (or refused under M:N threads, with a warning), true when started.
      #   sample_rate: samples per CPU second of each thread, 1..1000
      #   max_depth:   frames kept per stack, deeper stacks end in a "(truncated)" frame
      #   max_samples: distinct (stack, labels) pairs per window; past it samples are
      #                dropped and counted (stats[:window_dropped_samples])
      #   no_signals:  no timers and no SIGPROF at all (see ticker.c): on Ruby >= 3.3 the
      #                thread holding the GVL is sampled by a postponed job every interval of
      #                wall time; before 3.3 CPU is recorded only where labels change
      #   wall:        every sample also carries wall time (blocked, waiting for the GVL,
      #                holding it; see wall.c). Ruby >= 3.2 (WALL_SUPPORTED): ArgumentError before
      #   wall_all:    wall time of every thread; by default only while a thread has labels
      #                (a span, tags), so that idle pool threads do not fill the profile
      def start(sample_rate: DEFAULT_SAMPLE_RATE, max_depth: DEFAULT_MAX_DEPTH, max_samples: DEFAULT_MAX_SAMPLES,
                no_signals: false, wall: false, wall_all: false)
        { no_signals: no_signals, wall: wall, wall_all: wall_all }.each do |name, value|
          raise ArgumentError, "#{name} must be true or false, got #{value.inspect}" unless [true, false].include?(value)
        end

        options = [integer(:sample_rate, sample_rate), integer(:max_depth, max_depth),
                   integer(:max_samples, max_samples), no_signals, wall, wall_all]
        started = _start(*options)
        @started_with = options if started
        started
      end

      # Starts again as the last start did: after a stop that was not the application's
      # (an exec that failed).
      def restart
        _start(*@started_with)
      end

      def clear_labels
        set_labels(nil)
      end

      # Frames of files under these prefixes (and C functions) are trimmed from the leaf of
      # the stack that gets a span's CPU at a label change: the gem's own code at load, the
      # OpenTelemetry gems' when the span processor loads.
      def add_own_paths(*prefixes)
        @own_paths = (@own_paths || []) | prefixes.flat_map { |p| [p, (File.realpath(p) rescue p)] }
        self.own_paths = @own_paths
      end

      private

      def integer(name, value)
        return value if value.is_a?(Integer)

        raise ArgumentError, "#{name} must be an Integer, got #{value.inspect} (#{value.class})"
      end
    end
  end
end

Pyroscope::Native.add_own_paths(File.join(File.expand_path("..", __dir__), "pyroscope"))
