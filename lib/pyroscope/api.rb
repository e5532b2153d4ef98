# frozen_string_literal: true

require "monitor"

# The `pyroscope` gem's module functions, drop-in: configure, current_config, tags, stop,
# shutdown. Tags are written to the extension's label slots (through Pyroscope::Native),
# so a tag is on exactly the samples taken while it is set. Tags set by a thread for itself
# belong to the calling fiber, as the OpenTelemetry context does; tags set for another
# thread, and `thread_id`, are thread-wide: under the own tags of every fiber of it.
module Pyroscope

  @lock = Monitor.new
  @config = nil
  @exporter = nil
  @pid = nil

  class << self
    def configure
      config = Config.new
      yield config if block_given?
      config.apply_env.validate!
      Native.after_fork # as in stop
      @lock.synchronize do
        exporter = build_exporter(config) # raises on a bad server_address, before anything changes
        @exporter&.stop(timeout: 0)       # hands the current window to the queue, under the old settings
        Native.stop if sampler_options(@config) != sampler_options(config)
        Native.start(**sampler_options(config))
        @config = config
        @exporter = exporter
        @pid = Process.pid
        Stats.start
        exporter.start
        # a child of fork restarts profiling as soon as it can: the extension runs this block
        # after any fork of a profiling process (also one a C extension makes, from a
        # postponed job), or the hooks below do, whichever comes first, once
        Native.on_fork_child { send(:after_fork) }
        track_thread_ids(config.report_thread_id)
        config.meaningless_settings.each do |member, value|
          logger.debug("pyroscope: #{member} = #{value.inspect} has no meaning in-process; ignored")
        end
        at_exit { shutdown } unless @at_exit
        @at_exit = true
        config
      end
    end

    def current_config
      @config
    end

    # Stops sampling and hands the last window to the uploader, without waiting for it.
    # An interrupt (Thread#raise, a trap, Timeout) landing after the sampler's stop would leave
    # the exporter running without a sampler: the exporter stops in an ensure. (Not
    # Thread.handle_interrupt(Object => :never): a stop under it, in a child forked from a
    # non-main thread, hung Ruby 3.1 waiting for the GVL.)
    def stop
      Native.after_fork # a child whose restart has not run yet (a bare fork()'s): restart first, then stop its own
      @lock.synchronize do
        track_thread_ids(false)
        Native.on_fork_child # a child of a stopped profiler stays stopped
        begin
          Native.stop
        ensure
          @exporter&.stop(timeout: 0)
          @exporter = nil
        end
      end
      nil
    end

    # As stop, then waits (at most exit_timeout seconds) for pending windows to be sent.
    def shutdown
      timeout = @config&.exit_timeout || 0
      stop
      Native.flush(timeout) if @config
      nil
    end

    def thread_id
      Thread.current.native_thread_id
    end

    def tag_wrapper(tags)
      fiber_labels = Native.fiber_labels # the block and the ensure run on this fiber
      previous = Native.change_fiber_tags(fiber_labels, tags)
      yield
    ensure
      Native.change_fiber_tags(fiber_labels, previous) if previous
    end

    # _add_tags(tags) for the calling thread (pyroscope-otel 0.2, pyroscope 1.x), or
    # _add_tags(thread_id, tags) for the thread with that native id (0.1, 0.5–0.6).
    def _add_tags(*args)
      thread, tags = thread_and_tags(args, :_add_tags)
      change_tags(thread, tags) if thread
      nil
    end

    def _remove_tags(*args)
      thread, tags = thread_and_tags(args, :_remove_tags)
      keys = tags.is_a?(Hash) ? tags.keys : Array(tags)
      change_tags(thread, keys.to_h { |k| [k, nil] }) if thread
      nil
    end

    def tag(tags)
      deprecated(:tag, "tag_wrapper")
      change_tags(Thread.current, tags)
      nil
    end

    def remove_tags(*keys)
      deprecated(:remove_tags, "tag_wrapper")
      change_tags(Thread.current, keys.to_h { |k| [k, nil] })
      nil
    end

    def logger
      @logger ||= (@config || Config.new).effective_logger
    end

    private

    def build_exporter(config)
      @logger = config.effective_logger
      tags = config.tags.to_h { |k, v| [k.to_s, v.to_s] }
      tags["pid"] = Process.pid.to_s if config.report_pid
      Exporter.new(
        application_name: -> { config.effective_name }, server_address: config.server_address, logger: @logger,
        sample_rate: config.sample_rate, auth_token: config.auth_token, basic_auth_username: config.basic_auth_username,
        basic_auth_password: config.basic_auth_password, tenant_id: config.tenant_id, http_headers: config.http_headers,
        tags: tags, upload_interval: config.upload_interval, connect_timeout: config.connect_timeout,
        timeout: config.timeout, queue_max_windows: config.queue_max_windows, queue_max_bytes: config.queue_max_bytes,
        exit_timeout: config.exit_timeout, local_max_bytes: config.local_max_bytes, ca_file: config.ca_file
      )
    end

    def sampler_options(config)
      config && { sample_rate: config.sample_rate, max_depth: config.max_depth, max_samples: config.max_samples,
                  no_signals: config.no_signals, wall: config.wall?, wall_all: config.wall_scope == :all }
    end

    # Merges `tags` into the calling fiber's tags, or another thread's thread-wide ones (a
    # nil value removes the key).
    def change_tags(thread, tags)
      return Native.change_fiber_tags(Native.fiber_labels, tags) if thread == Thread.current

      Native.change_thread_tags(thread, tags)
    end

    def thread_and_tags(args, name)
      case args
      in [Hash => tags] then [Thread.current, tags]
      in [Integer => id, tags] then [Thread.list.find { |t| t.native_thread_id == id }, tags]
      in [Integer => id] then [Thread.list.find { |t| t.native_thread_id == id }, {}]
      else raise ArgumentError, "#{name}(tags) or #{name}(thread_id, tags): got #{args.inspect}"
      end
    end

    def track_thread_ids(enabled)
      @thread_id_tracker&.disable
      @thread_id_tracker = nil
      return unless enabled

      Thread.list.each { |t| Native.change_thread_tags(t, { "thread_id" => t.native_thread_id }) if t.native_thread_id }
      @thread_id_tracker = TracePoint.new(:thread_begin) { Native.change_thread_tags(Thread.current, { "thread_id" => thread_id }) }
      @thread_id_tracker.enable
    end

    def deprecated(name, instead)
      @warned ||= {}
      return if @warned[name]

      @warned[name] = true
      # not category: :deprecated, which Ruby silences by default: upstream's warning was visible
      warn "Pyroscope.#{name} is deprecated; use Pyroscope.#{instead}", uplevel: 2
    end

    # The child of a fork: the extension stopped itself (no timer survives fork) and forgot
    # the parent's window and queue; this starts the child's own profiling and uploads.
    # A failure here must not fail the application's fork (nor can it reach the
    # application when this runs on the extension's own thread): it is logged.
    def after_fork
      @lock = Monitor.new
      return unless @config && @exporter && @pid != Process.pid

      @exporter = build_exporter(@config)
      @pid = Process.pid
      Native.start(**sampler_options(@config))
      Stats.start
      @exporter.start
    rescue StandardError => e
      logger.error("pyroscope: not profiling this child of fork (pid #{Process.pid}): #{e.class}: #{e.message}")
    end
  end


  # Process._fork is what Kernel#fork, Process.fork and IO.popen("-") go through since Ruby
  # 3.1: the child restarts before its first line runs. Process.daemon forks in C
  # (daemon(3)), without _fork; it returns in the daemon only.
  module ForkHook
    def _fork
      pid = super
      Pyroscope::Native.after_fork if pid.zero?
      pid
    end

    def daemon(*)
      super.tap { Pyroscope::Native.after_fork }
    end
  end
  Process.singleton_class.prepend(ForkHook)

  # A timer signal still pending at exec would reach the new program, whose default
  # action for SIGPROF is to die: the timers go before exec does. An exec that raises
  # (ENOENT, EACCES, ...) leaves this process running, so sampling comes back.
  module ExecHook
    def exec(*args, **opts)
      stopped = Pyroscope::Native.stop
      super
    ensure
      Pyroscope::Native.restart if stopped
    end
  end
  Kernel.singleton_class.prepend(ExecHook)
  Process.singleton_class.prepend(ExecHook)
  # Kernel#exec is private (a public one would make every object answer to it): so is its hook
  Kernel.prepend(ExecHook.dup.tap { |hook| hook.send(:private, :exec) })
end
