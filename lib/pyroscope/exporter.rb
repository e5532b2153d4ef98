# frozen_string_literal: true

require "logger"
require "rbconfig"
require "uri"
require "fileutils"

module Pyroscope
  # Takes the sampler's window every `upload_interval` seconds (aligned to the wall clock)
  # and hands it to the native uploader: the Ruby part (frames to strings, the export
  # model) runs on this class's own thread, which the sampler never samples; encoding,
  # gzip and HTTP run on the uploader's native thread without the GVL.
  # A server_address of file:///some/dir is the local target: the same windows are written
  # there as gzipped pprof files (<app>-<UTC start>-<pid>[.<part>].pb.gz), at most
  # local_max_bytes of them, the oldest removed first.
  class Exporter
    APP_NAME = %r{\A[A-Za-z0-9_.\-/]+\z}
    SPY_NAME = "rbspy" # what Pyroscope's UI knows as Ruby; the Ruby SDK sent it too
    LEVELS = { 1 => Logger::INFO, 2 => Logger::WARN, 3 => Logger::ERROR }.freeze

    attr_reader :exit_timeout

    # The exporters started and not stopped, each with the pid that started it: one at_exit
    # for the process sends their last windows. (An at_exit per exporter held every exporter
    # ever started, its block's self, for the life of the process.)
    @live = {}
    @live_lock = Mutex.new
    @cpu_ns = 0 # the CPU every export took, on the thread that ran it (Pyroscope.stats)

    class << self
      attr_reader :cpu_ns

      def add_cpu_ns(ns)
        @live_lock.synchronize { @cpu_ns += ns }
      end

      def started(exporter)
        @live_lock.synchronize do
          @live.delete_if { |_, pid| pid != Process.pid } # a parent's, inherited by fork
          @live[exporter] = Process.pid
        end
      end

      def stopped(exporter)
        @live_lock.synchronize { @live.delete(exporter) }
      end

      # Only the process that started an exporter stops it: a forked child runs its
      # parent's at_exit blocks too.
      def stop_live
        live = @live_lock.synchronize { @live.select { |_, pid| pid == Process.pid }.keys }
        live.each { |exporter| exporter.stop(timeout: exporter.exit_timeout) }
      end
    end
    at_exit { stop_live } # the last, partial windows go out at exit too, with a bounded wait

    def initialize(application_name:, server_address:, logger:, sample_rate: Native::DEFAULT_SAMPLE_RATE,
                   auth_token: nil, basic_auth_username: nil, basic_auth_password: nil, tenant_id: nil,
                   http_headers: {}, tags: {}, upload_interval: 10, connect_timeout: 5, timeout: 10,
                   queue_max_windows: 12, queue_max_bytes: 64 << 20, max_attempts: 5, ca_file: nil,
                   app_root: Dir.pwd, exit_timeout: 5, local_max_bytes: 256 << 20)
      # a String, or a Proc giving it for each window (Pyroscope.configure's: the name may
      # come from OpenTelemetry's SDK, configured later)
      @app = application_name.respond_to?(:call) ? application_name : check_app_name(application_name)
      @uri = check_server(server_address)
      @logger = logger
      @sample_rate = sample_rate
      @interval = check_positive(:upload_interval, upload_interval)
      @tags = tags
      @export_opts = [sample_rate, File.expand_path(app_root), library_prefixes, tags.empty? ? nil : tags].freeze
      headers = request_headers(auth_token, basic_auth_username, basic_auth_password, tenant_id, http_headers)
      Native._configure_transport(headers, ms(:connect_timeout, connect_timeout), ms(:timeout, timeout),
                                  Integer(queue_max_windows), Integer(queue_max_bytes), Integer(max_attempts),
                                  "pyroscope-otel/#{VERSION} ruby/#{RUBY_VERSION}", ca_file,
                                  Integer(local_max_bytes))
      @exit_timeout = check_positive(:exit_timeout, exit_timeout)
      @mutex = Mutex.new
      @wake = ConditionVariable.new
      @thread = nil
    end

    def start
      @mutex.synchronize do
        return if @thread

        @stopping = false
        @thread = Thread.new { run }
        @thread.name = "pyroscope-exporter"
      end
      self.class.started(self)
    end

    # Sends the last, partial window and waits at most `timeout` seconds for the queue.
    def stop(timeout: 5)
      thread = @mutex.synchronize do
        @stopping = true
        @wake.signal
        @thread.tap { @thread = nil }
      end
      self.class.stopped(self)
      thread&.join(timeout)
      export_window(final: true)
      drained = Native.flush(timeout)
      log_events
      drained
    end

    def export_window(final: false)
      t0 = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID, :nanosecond)
      taken = Native._take_model(@export_opts)
      if taken
        # whole seconds, as the server parses them, also for a sub-second upload_interval
        aligned = (taken.started_at_ns / 1e9 / @interval).floor * @interval
        from = aligned.floor
        till = [from + 1, (final ? taken.ended_at_ns / 1e9 : aligned + @interval).ceil].max
        Native._enqueue_model(taken, url(from, till), log_url)
      end
      self.class.add_cpu_ns(Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID, :nanosecond) - t0)
      log_events
    end

    private

    # A window that fails to export (or a Logger that raises on an upload event) costs that
    # window, never the later ones: the thread goes on, and says so once per run of failures.
    def run
      Native.exclude_current_thread
      failing = false
      loop do
        @mutex.synchronize do
          now = Process.clock_gettime(Process::CLOCK_REALTIME)
          @wake.wait(@mutex, ((now / @interval).floor + 1) * @interval - now) unless @stopping
        end
        break if @stopping

        export_window
        failing = false
      rescue StandardError => e
        report_failure(e) unless failing
        failing = true
      end
    end

    def report_failure(error)
      message = "pyroscope: exporting a window failed (later windows still go): #{error.class}: #{error.message}"
      begin
        @logger.error(message)
      rescue StandardError
        warn message # the Logger itself is what fails: stderr is what is left
      end
    end

    def log_events
      Native.upload_events.each { |level, message| @logger.add(LEVELS.fetch(level, Logger::WARN), "pyroscope: #{message}") }
    end

    def url(from, till)
      app = @app.respond_to?(:call) ? check_app_name(@app.call) : @app
      if @uri.scheme == "file"
        stamp = Time.at(from).utc.strftime("%Y%m%dT%H%M%SZ")
        return "file://#{@uri.path}/#{app.tr("/", "_")}-#{stamp}-#{Process.pid}"
      end

      query = URI.encode_www_form(name: app, from: from, until: till, format: "pprof",
                                  sampleRate: @sample_rate, spyName: SPY_NAME)
      "#{@uri}/ingest?#{query}"
    end

    def log_url
      return @uri.to_s if @uri.scheme == "file"

      @log_url ||= begin
        safe = @uri.dup
        safe.user = nil
        safe.password = nil
        "#{safe}/ingest"
      end
    end

    def request_headers(token, user, password, tenant, extra)
      headers = ["Content-Type: binary/octet-stream", "Content-Encoding: gzip"]
      if token && !token.to_s.empty?
        headers << "Authorization: Bearer #{token}"
      elsif user && password && !user.to_s.empty? && !password.to_s.empty?
        headers << "Authorization: Basic #{["#{user}:#{password}"].pack("m0")}"
      end
      headers << "X-Scope-OrgID: #{tenant}" if tenant && !tenant.to_s.empty?
      raise ArgumentError, "http_headers must be a Hash, got #{extra.class}" unless extra.is_a?(Hash)

      extra.each do |name, value|
        name = name.to_s
        value = value.to_s
        unless name.match?(/\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\z/) && !value.match?(/[\r\n\0]/)
          raise ArgumentError, "http_headers: invalid header #{name.inspect} (a token name and a value without line breaks)"
        end

        headers << "#{name}: #{value}"
      end
      headers
    end

    def check_app_name(name)
      return name if name.is_a?(String) && name.match?(APP_NAME)

      raise ArgumentError, "application_name must match #{APP_NAME.source} (letters, digits, _ . - /), got #{name.inspect}"
    end

    def check_server(address)
      uri = URI.parse(address.to_s)
      return local_dir(uri, address) if uri.scheme == "file"
      unless %w[http https].include?(uri.scheme) && uri.host && !uri.host.empty?
        raise ArgumentError, "server_address must be an http:// or https:// URL or file:///dir, got #{address.inspect}"
      end

      uri.query = nil
      uri.fragment = nil
      uri.path = uri.path.chomp("/")
      uri
    rescue URI::InvalidURIError
      raise ArgumentError, "server_address must be an http:// or https:// URL or file:///dir, got #{address.inspect}"
    end

    def local_dir(uri, address)
      path = URI.decode_www_form_component(uri.path.to_s)
      unless uri.host.to_s.empty? || uri.host == "localhost"
        raise ArgumentError, "server_address: a file:// URL names a local directory (file:///dir), got #{address.inspect}"
      end
      raise ArgumentError, "server_address: file:// needs an absolute directory, got #{address.inspect}" if path.empty?

      FileUtils.mkdir_p(path)
      raise ArgumentError, "server_address: cannot write to #{path}" unless File.writable?(path)

      URI::File.build(path: File.realpath(path).chomp("/"))
    rescue SystemCallError => e
      raise ArgumentError, "server_address: cannot create #{path}: #{e.message}"
    end

    def check_positive(name, value)
      return value if value.is_a?(Numeric) && value.positive?

      raise ArgumentError, "#{name} must be a positive number, got #{value.inspect}"
    end

    def ms(name, seconds)
      (check_positive(name, seconds) * 1000).ceil
    end

    def library_prefixes
      %w[rubylibdir rubyarchdir vendorlibdir sitelibdir].filter_map { |k| RbConfig::CONFIG[k] }.uniq
    end
  end
end
